"""Test process setup: 8 virtual CPU devices (for sharding tests) before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import numpy as np  # noqa: E402  (after the environment is set)
import pytest  # noqa: E402


@pytest.fixture
def rng():
  """A generator on a fresh seed per test; the seed is printed so pytest shows it on failure."""
  seed = np.random.SeedSequence().entropy
  print("seed", seed)
  return np.random.default_rng(seed)
