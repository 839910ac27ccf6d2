"""Test setup: fake CPU devices, fast compiles and a persistent compile cache.

Must run before jax is imported anywhere, hence environment variables at import time.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)
jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get(
        "CXRJAX_TEST_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")
    ),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture
def rng():
    return jax.random.key(0)


@pytest.fixture(scope="session")
def shipped_data_dir(tmp_path_factory):
    """The shipped PneumoniaMNIST subset prepared once per test session (a few seconds)."""
    from cxrjax.data import builders

    data_dir = tmp_path_factory.mktemp("cxrjax_data")
    builders.prepare("pneumonia_mnist", data_dir=data_dir)
    return str(data_dir)
