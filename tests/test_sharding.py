"""A tiny PixelLLM forward + gradient under (data, fsdp, tensor) meshes equals one device.

Runs on the 8 fake CPU devices set up in conftest.py. The issue's `(data, model)` meshes are
(data, fsdp=1, tensor) here: `tensor` is the model-parallel axis of our rules table.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ln
from pixel_llm import sharding
from pixel_llm.models import build

B = 8


@functools.lru_cache(maxsize=None)
def _setup():
  config = ln.get_config("toy")
  config.unlock()
  config.model.image_size = 64  # 4x4 token grids keep compiles short
  config.input.max_target_len = 6
  model = build.build_model(config)
  batch = build.example_batch(config, B, abstract=False)
  keys = jax.random.split(jax.random.key(3), 4)
  v = config.model.t5.vocab_size
  targets = jax.random.randint(keys[0], batch["decoder_target_tokens"].shape, 2, v)
  batch.update(
      image=jax.random.uniform(keys[1], batch["image"].shape),
      prompt_text=jax.random.randint(keys[2], batch["prompt_text"].shape, 0, v),
      decoder_target_tokens=targets,
      decoder_input_tokens=jnp.pad(targets[..., :-1], ((0, 0), (0, 0), (1, 0))),
      point_targets=jax.random.uniform(keys[3], batch["point_targets"].shape),
      point_weights=jnp.ones(batch["point_weights"].shape))
  boxed = jax.eval_shape(model.init_variables, jax.random.key(0), batch)["params"]
  params = nn.meta.unbox(model.init_variables(jax.random.key(0), batch)["params"])
  params = jax.tree.map(lambda x: x + 0.01, params)  # LoRA B != 0 so every path is exercised
  loss_and_grad = jax.value_and_grad(lambda p, b: model.loss_fn(p, b, None, train=False)[0])
  reference = jax.jit(loss_and_grad)(params, batch)
  return boxed, params, batch, loss_and_grad, reference


@pytest.mark.parametrize("shape", [dict(data=8), dict(data=4, tensor=2),
                                   dict(fsdp=8), dict(data=2, fsdp=2, tensor=2)])
def test_sharded_loss_and_grad_equal_single_device(shape):
  assert jax.device_count() == 8, "conftest.py sets 8 fake CPU devices"
  boxed, params, batch, loss_and_grad, (ref_loss, ref_grads) = _setup()
  mesh = sharding.make_mesh(shape)
  param_sh = sharding.logical_to_mesh_sharding(boxed, mesh)
  batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    fn = jax.jit(loss_and_grad, in_shardings=(param_sh, batch_sh),
                 out_shardings=(sharding.replicated(mesh), param_sh))
    loss, grads = fn(jax.device_put(params, param_sh), jax.device_put(batch, batch_sh))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_parameters_are_actually_sharded_on_tensor_and_fsdp():
  boxed, *_ = _setup()
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  shardings = sharding.logical_to_mesh_sharding(boxed, mesh)
  flat = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
  embed = [s for k, s in flat.items() if "shared" in k and "embedding" in k]
  assert embed and embed[0].spec == jax.sharding.PartitionSpec("tensor", "fsdp")


def test_make_mesh_validates_shapes():
  assert sharding.make_mesh(dict(data=-1, tensor=2)).shape == {"data": 4, "fsdp": 1, "tensor": 2}
  with pytest.raises(ValueError, match="Unknown mesh axes"):
    sharding.make_mesh(dict(model=2))
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh(dict(data=16))
