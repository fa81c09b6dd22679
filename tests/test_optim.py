"""Optimizer pieces: learning-rate multipliers (regex rules, layer decay) act as per-parameter
learning rates; gradient accumulation equals the mean of the microbatches' gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixel_llm import optim
from pixel_llm import trainer
from pixel_llm.models import scan


def _params():
  w = jnp.ones((2, 3))
  return {"eva02": {"patch_embed": {"kernel": w}, "blocks_0": {"mlp": {"kernel": w}},
                    "blocks_1": {"mlp": {"kernel": w}}},
          "t5": {"encoder": {"kernel": w}}, "location_head": {"kernel": w}}


def test_layer_decay_and_rules_give_the_documented_multipliers():
  m = optim.lr_multipliers(_params(), [("^t5/", 0.1)], layer_decay=0.5, tower="eva02")
  # 2 blocks: block i -> 0.5 ** (2 - i), the tower's embeddings 0.5 ** 3, elsewhere the rules / 1.
  assert m["eva02"]["blocks_1"]["mlp"]["kernel"] == 0.5
  assert m["eva02"]["blocks_0"]["mlp"]["kernel"] == 0.25
  assert m["eva02"]["patch_embed"]["kernel"] == 0.125
  assert m["t5"]["encoder"]["kernel"] == 0.1
  assert m["location_head"]["kernel"] == 1.0
  with pytest.raises(ValueError, match="no parameters match"):
    optim.lr_multipliers(_params(), layer_decay=0.9, tower="sam")


@pytest.mark.parametrize("period", [None, 2])
def test_layer_decay_over_a_scanned_tower_equals_the_unrolled_rates(period):
  """Scan over layers stacks the tower's blocks into one leaf per weight (leading layer axis; with
  a period, groups of p blocks): each layer along that axis keeps the unrolled block's rate."""
  w = jnp.ones((2, 3))
  unrolled = {"eva02": {"patch_embed": {"kernel": w},
                        **{f"blocks_{i}": {"mlp": {"kernel": w * i}} for i in range(4)}},
              "t5": {"kernel": w}}
  stacked = {**unrolled, "eva02": scan.stack_layers(unrolled["eva02"], "blocks_{i}", "blocks",
                                                    period=period)}
  want = optim.lr_multipliers(unrolled, [("^t5/", 0.1)], layer_decay=0.5)
  got = optim.lr_multipliers(stacked, [("^t5/", 0.1)], layer_decay=0.5)
  rows = jax.tree.map(lambda m: np.broadcast_to(np.float32(m), (2, 3)), want["eva02"])
  rows = scan.stack_layers(rows, "blocks_{i}", "blocks", period=period)
  for a, b in zip(jax.tree.leaves(rows), jax.tree.leaves(got["eva02"])):
    np.testing.assert_allclose(np.broadcast_to(b, a.shape), a, rtol=1e-6)
  assert got["eva02"]["patch_embed"]["kernel"] == 0.5 ** 5 and got["t5"]["kernel"] == 0.1
  # The update of each stacked layer is scaled by its own rate.
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), stacked)
  tx = optim.scale_by_tree(got)
  updates, _ = tx.update(grads, tx.init(stacked))
  for u, m in zip(jax.tree.leaves(updates["eva02"]["blocks"]),
                  jax.tree.leaves(got["eva02"]["blocks"])):
    np.testing.assert_allclose(u, 0.3 * np.broadcast_to(m, u.shape), rtol=1e-6)


def test_multipliers_scale_the_adamw_update_like_a_learning_rate():
  params = _params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  kwargs = dict(learning_rate=1e-2, total_steps=100, warmup_steps=1, grad_clip_norm=None)
  plain, _ = optim.make_optimizer(params, **kwargs)
  scaled, _ = optim.make_optimizer(params, lr_rules=[("^t5/", 0.1)], layer_decay=0.5, **kwargs)
  mult = optim.lr_multipliers(params, [("^t5/", 0.1)], 0.5)

  def two_updates(tx):
    state = tx.init(params)
    for _ in range(2):  # step 0 has learning rate 0 (warmup)
      updates, state = tx.update(grads, state, params)
    return updates

  a, b = two_updates(plain), two_updates(scaled)
  for ua, ub, m in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(mult)):
    assert np.abs(ua).max() > 0
    np.testing.assert_allclose(ub, ua * m, rtol=1e-6)


def test_gradient_accumulation_is_the_mean_of_microbatch_gradients():
  """make_train_step(accum_steps=2) on a batch == the mean of plain steps' gradients on its two
  microbatches (rows 0, 2, ... and 1, 3, ...), checked through SGD with learning rate 1."""
  import optax

  class Quadratic:  # a model adapter with one parameter and a per-example weighted loss
    def loss_fn(self, params, batch, rng, train):
      del rng, train
      err = batch["x"] @ params["w"] - batch["y"]
      loss = jnp.mean(err ** 2)
      return loss, {"loss": loss, "num_examples": jnp.float32(batch["x"].shape[0])}

  params = {"w": jnp.array([0.5, -1.0, 2.0])}
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
           "y": jnp.asarray(rng.normal(size=(8,)), jnp.float32)}
  labels = {"w": "train"}
  tx = optax.sgd(1.0)
  schedule = lambda step: 1.0  # noqa: E731
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0),
           "skipped_steps": jnp.int32(0), "consecutive_skips": jnp.int32(0)}
  step2 = jax.jit(trainer.make_train_step(Quadratic(), tx, schedule, labels, jax.random.key(0), 2))
  new, metrics = step2(state, batch)
  grad = lambda b: jax.grad(lambda p: Quadratic().loss_fn(p, b, None, True)[0])(params)["w"]  # noqa: E731
  halves = [jax.tree.map(lambda x, i=i: x[i::2], batch) for i in range(2)]
  expected = params["w"] - (grad(halves[0]) + grad(halves[1])) / 2
  np.testing.assert_allclose(new["params"]["w"], expected, rtol=1e-5)
  assert float(metrics["num_examples"]) == 8.0  # counts add up, losses average
  losses = [float(Quadratic().loss_fn(params, h, None, True)[0]) for h in halves]
  np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses), rtol=1e-5)
