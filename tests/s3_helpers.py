"""The moto S3 server handle shared by tests/conftest.py and tests/s3_faults.py.

A module of its own (not conftest): tests/multihost has a conftest too, and
``from conftest import ...`` would find whichever pytest imported first.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from typing import Iterator, Mapping

DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@contextlib.contextmanager
def environ(values: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` updated with ``values`` inside the block, each variable restored (or removed) after it."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class S3Server:
    """Handle on the running moto server."""

    endpoint: str  # "127.0.0.1:PORT"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def make_bucket(self, name: str) -> None:
        """Create bucket ``name`` (no error if it already exists)."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.url, region_name="us-east-1")
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass

    def uri(self, bucket: str, prefix: str = "") -> str:
        """An ``s3://`` storage URI pointing at this server."""
        return (f"s3://{bucket}/{prefix.strip('/')}"
                f"?endpoint_override={self.endpoint}&scheme=http&region=us-east-1")
