"""Shared pytest fixtures.

``scenarios``: the built-in scenarios plus the test-only ones in tests/scenarios.
``store``: a local storage directory shared by one test module (artifacts are
content-addressed, so tests reuse each other's training).

``s3_server``: a moto S3 server on 127.0.0.1 for the whole session, so storage
code can be tested against a real ``s3://`` endpoint without the network::

    def test_x(s3_server):
        s3_server.make_bucket("b")
        st = Storage.open(s3_server.uri("b", "prefix"))
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

TEST_SCENARIOS = Path(__file__).parent / "scenarios"


@pytest.fixture(scope="session")
def scenarios():
    from harness.scenario import discover

    return discover([TEST_SCENARIOS])


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return str(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="session")
def zoo_store(tmp_path_factory):
    """Storage holding every zoo scenario trained once per session (see ``zoo_trained``)."""
    return str(tmp_path_factory.mktemp("zoo-store"))


@pytest.fixture(scope="session")
def zoo_trained(scenarios, zoo_store):
    """``{name: TrainResult}``: each zoo scenario trained once, in this process, saved in every format.

    Plain ``train()`` calls, one after the other in one process, as a reused Ray
    worker would run them: leaks of Keras global state between scenarios show.
    """
    from harness.spec import FORMATS, Environment
    from harness.train import train

    names = [n for n in scenarios if n.startswith("zoo-")]
    return {n: train(scenarios[n], list(FORMATS), zoo_store, Environment(name="training")) for n in names}

from s3_helpers import DUMMY_AWS_ENV as _DUMMY_AWS_ENV, S3Server, environ as _environ, free_port as _free_port  # noqa: E402


@pytest.fixture(scope="session")
def s3_server():
    """Session-wide moto S3 server on 127.0.0.1 with dummy AWS credentials in ``os.environ``."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per S3 request otherwise

    with _environ(_DUMMY_AWS_ENV):
        port = _free_port()
        srv = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
        srv.start()
        try:
            yield S3Server(endpoint=f"127.0.0.1:{port}")
        finally:
            srv.stop()
