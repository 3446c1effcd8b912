"""Test session set-up: 8 virtual CPU devices, so shard_map tests run on any machine.

The device count must be fixed before JAX initialises its backend, hence here and not in a test.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
