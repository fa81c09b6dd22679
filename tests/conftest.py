"""Test-session setup shared by every test file.

- 8 fake CPU devices, so sharding tests run real multi-device programs on one CPU. This must happen
  before jax is imported anywhere, which is why it lives here.
- XLA's optimisation passes are off: the tests run tiny models whose cost is almost all compile
  time, and the passes change no result the tests look at (about 2x faster compiles on CPU).
- torchvision on the package index is CUDA-linked; beside the CPU torch its compiled ops cannot load
  and two registration modules crash at import, which breaks `import timm` and transformers' T5/SAM.
  Pre-registering those two modules as empty lets the pure-Python parts import (see
  shared/reference/feasibility.md, section 3).
"""
import os
import sys
import types

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# libtpu (for the ahead-of-time TPU compiles of tests/test_aot.py) is installed with the test extra:
# keep jax on the CPU backend (topology descriptions still work) and let several processes (xdist
# workers) load libtpu at once.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

if "torchvision" not in sys.modules:
  for _name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
    sys.modules.setdefault(_name, types.ModuleType(_name))
