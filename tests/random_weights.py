"""Random weights for a tree of parameter shapes, drawn with numpy (not a test module).

No XLA init program to compile, and large enough that an untrained model writes varied tokens
and boxes: kernels ~ N(0, 1 / fan_in), norm scales near 1, everything else small.
"""
import jax
import numpy as np


def random_params(shapes, seed: int = 0):
  """shapes: a tree of arrays or ShapeDtypeStructs -> the same tree of float32 numpy arrays."""
  rng = np.random.RandomState(seed)

  def fill(path, s):
    if len(s.shape) >= 2:
      return rng.normal(0, 1 / np.sqrt(np.prod(s.shape[:-1])), s.shape).astype(np.float32)
    if jax.tree_util.keystr(path).endswith(("scale']", "weight']")):
      return (1 + 0.1 * rng.normal(size=s.shape)).astype(np.float32)
    return (0.02 * rng.normal(size=s.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)
