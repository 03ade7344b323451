"""Suite-wide set-up: 8 virtual CPU devices (before jax is imported) and a private token cache."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def token_cache_dir(tmp_path_factory) -> str:
    """One token cache for the whole session: the built-in corpus is tokenized once."""
    return str(tmp_path_factory.mktemp("token_cache"))
