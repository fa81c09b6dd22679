"""pixel_llm.checkpoints on a tiny tree: round trip, params-only restore, and the errors a user
meets when a checkpoint does not fit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixel_llm import checkpoints


def _state(width=3):
  return {"params": {"w": jnp.arange(width, dtype=jnp.float32)},
          "opt": {"mu": jnp.ones((width,), jnp.float32)}, "step": jnp.asarray(7, jnp.int32)}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


@pytest.fixture
def saved(tmp_path):
  mgr = checkpoints.manager(str(tmp_path), asynchronous=False)
  checkpoints.save(mgr, 7, _state(), {"epoch": 2})
  mgr.wait_until_finished()
  return mgr


def test_round_trip_and_params_only(saved):
  state, position = checkpoints.restore(saved, _abstract(_state()))
  np.testing.assert_array_equal(state["params"]["w"], [0, 1, 2])
  assert int(state["step"]) == 7 and position == {"epoch": 2}
  # Another optimizer state (here: none at all) does not matter to a params-only restore.
  params = checkpoints.restore_params(saved, _abstract(_state()["params"]))
  np.testing.assert_array_equal(params["w"], [0, 1, 2])


def test_errors_name_the_checkpoint_and_the_way_out(saved, tmp_path):
  with pytest.raises(ValueError, match=r"checkpoints/7: its parameters do not match .* trained "
                     r"with"):
    checkpoints.restore_params(saved, _abstract(_state(width=4)["params"]))
  with pytest.raises(ValueError, match=r"checkpoints/7: not a pixel_llm training checkpoint"):
    checkpoints.restore(saved, _abstract({"other": jnp.zeros((2,))}))
  empty = checkpoints.manager(str(tmp_path / "empty"), asynchronous=False)
  with pytest.raises(FileNotFoundError, match="No checkpoint in"):
    checkpoints.restore_params(empty, _abstract(_state()["params"]))
