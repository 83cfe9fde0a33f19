"""Suite-wide fixtures."""

import os

import pytest

# Set by Lightning's in-process launchers (e.g. ddp_spawn): a later subprocess test inheriting MASTER_PORT would try
# to bind a port this process may still hold, and fail with EADDRINUSE.
DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def _restore_distributed_env():
    before = {key: os.environ.get(key) for key in DISTRIBUTED_ENV}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
