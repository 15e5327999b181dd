"""The multi-host rig for every test in this directory: started once per session, shared by all.

Skipped, with a one-line reason, where the machine cannot build it (not root,
no ``ip netns``). A rig that cannot start fails the tests with the reason and
the end of every host's log. Each test gets the rig healthy (links up, S3
running, every worker host an alive Ray node, restarted if a fault took it).
"""

from __future__ import annotations

import pytest

import rig as rigs
from s3_helpers import environ


@pytest.fixture(scope="session")
def rig():
    reason = rigs.unavailable()
    if reason:
        pytest.skip(reason)
    r = rigs.Rig()
    try:
        r.start()
    except rigs.RigError as exc:
        pytest.fail(f"the multi-host rig did not start: {exc}", pytrace=False)
    # This process reads what runs published in the rig's S3 (moto refuses unsigned requests):
    # its dummy credentials, whether or not another test's S3 server set them already.
    try:
        with environ(rigs.DUMMY_AWS):
            yield r
    finally:
        r.close()


@pytest.fixture
def healthy(rig):
    """The rig, with every fault of an earlier test undone."""
    try:
        rig.ensure_healthy()
    except rigs.RigError as exc:
        pytest.fail(f"the multi-host rig could not be made healthy again: {exc}\n{rig.log_tails()}", pytrace=False)
    return rig
