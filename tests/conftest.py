"""Suite-wide set-up: 8 virtual CPU devices (before jax is imported) and a private token cache."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def token_cache_dir(tmp_path_factory) -> str:
    """One token cache for the whole session: the built-in corpus is tokenized once."""
    return str(tmp_path_factory.mktemp("token_cache"))


TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=8", "model.n_kv_heads=4",
    "train.batch_size=8", "train.seq_len=32", "train.steps=6", "train.log_every=1",
    "train.eval_every=3", "train.eval_batches=2", "checkpoint.every=3", "optim.warmup_steps=2",
    "logging.progress=false", "logging.peak_flops=1e12",
]


@pytest.fixture
def tiny_overrides(token_cache_dir) -> list[str]:
    """Overrides that make any experiment tiny (seconds to train) with the session's token cache."""
    return [*TINY, f"data.cache_dir={token_cache_dir}"]


@pytest.fixture
def tiny(tiny_overrides):
    """A builder of tiny experiment configs on the built-in corpus."""
    from research import config

    return lambda *overrides: config.load(None, [*tiny_overrides, *overrides])
