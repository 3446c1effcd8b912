"""Test session set-up, fixed before JAX is imported (hence here and not in a test):

- 8 virtual CPU devices, so the shard_map tests run on any machine;
- full float32 matmuls and convolutions: the tests compare against float64 NumPy references, and
  on GPUs XLA's default precision runs float32 matmuls in TF32 (measured on an H100: ResNet logits
  off by 8e-4 against 1e-4 tolerances). No effect on CPUs.
"""
import os

os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
