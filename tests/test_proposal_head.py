"""Tests for pixel_llm.models.proposal_head: shapes, logical axes, decoding and a tiny overfit."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pixel_llm.detection import boxes as box_lib
from pixel_llm.models import proposal_head as ph
from pixel_llm.sharding import LOGICAL_RULES


def _tiny(**kw):
  return ph.ProposalHead(width=16, num_groups=4, num_convs=1, **kw)


def test_output_shapes_per_level():
  x = jnp.ones((2, 6, 7, 12))
  for top, strides in ((1, (8, 16, 32, 64)), (2, (8, 16, 32, 64, 128))):
    m = _tiny(num_top_levels=top)
    out = jax.eval_shape(lambda x: m.apply(m.init(jax.random.PRNGKey(0), x), x), x)
    assert m.strides == strides
    shapes = ph.pyramid_shapes(6, 7, top)
    assert shapes[:4] == ((12, 14), (6, 7), (3, 3), (2, 2))
    assert [tuple(l.shape) for l in out["logits"]] == [(2,) + s for s in shapes]
    assert [tuple(l.shape) for l in out["ltrb"]] == [(2,) + s + (4,) for s in shapes]


def test_every_param_has_logical_axes():
  m = ph.ProposalHead(width=32, num_groups=8, num_convs=2)
  params = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.ones((1, 4, 4, 24)))["params"]
  known = {name for name, _ in LOGICAL_RULES}
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert len(leaves) > 30
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned)
    assert len(leaf.names) == leaf.value.ndim
    assert all(n is None or n in known for n in leaf.names), leaf.names


def test_bad_input_errors():
  with pytest.raises(ValueError, match="num_groups"):
    ph.ProposalHead(width=12, num_groups=8).init(jax.random.PRNGKey(0), jnp.ones((1, 4, 4, 8)))
  with pytest.raises(ValueError, match=r"\[B, H, W, D\]"):
    _tiny().init(jax.random.PRNGKey(0), jnp.ones((4, 4, 8)))
  with pytest.raises(ValueError, match="one of each per level"):
    ph.decode_proposals([jnp.zeros((1, 2, 2))], [], (8,), (16, 16))


def test_decode_hand_example():
  # One 4x4 level at stride 8, a 32x32 image. Cell (row 1, col 2) -> grid point (20, 12), ltrb
  # (1, 1, 2, 2) strides -> box (12, 4, 36, 28), clipped to x1 = 32. Cell (3, 3) -> point (28, 28),
  # ltrb 1 stride -> (20, 20, 36, 36), clipped to 32. The rest score sigmoid(-12) < 1e-4: invalid.
  logits = jnp.full((1, 4, 4), -12.0).at[0, 1, 2].set(3.0).at[0, 3, 3].set(1.0)
  ltrb = jnp.zeros((1, 4, 4, 4)).at[0, 1, 2].set(jnp.array([1.0, 1.0, 2.0, 2.0]))
  ltrb = ltrb.at[0, 3, 3].set(jnp.array([1.0, 1.0, 1.0, 1.0]))
  boxes, scores, valid = ph.decode_proposals([logits], [ltrb], (8,), (32, 32), post_nms_topk=4)
  assert boxes.shape == (1, 4, 4) and scores.shape == (1, 4) and valid.shape == (1, 4)
  np.testing.assert_array_equal(valid[0], [True, True, False, False])
  np.testing.assert_allclose(boxes[0, :2], [[12, 4, 32, 28], [20, 20, 32, 32]])
  np.testing.assert_allclose(scores[0, :2], jax.nn.sigmoid(jnp.array([3.0, 1.0])), rtol=1e-6)
  np.testing.assert_array_equal(boxes[0, 2:], 0.0)


def test_tiny_head_overfits_one_image():
  # 128x128 image -> an 8x8 stride-16 feature grid whose channels paint each box and the (x, y)
  # position; the head must learn to put heatmap peaks at the centres and regress the extents.
  gt = np.array([[16, 16, 64, 56], [72, 24, 120, 88], [24, 80, 72, 120]], np.float32)
  ys, xs = np.meshgrid(np.arange(8) * 16 + 8, np.arange(8) * 16 + 8, indexing="ij")
  chans = [(xs >= b[0]) & (xs < b[2]) & (ys >= b[1]) & (ys < b[3]) for b in gt]
  x = jnp.asarray(np.stack(chans + [xs / 128.0, ys / 128.0], -1)[None].astype(np.float32))
  m = _tiny(num_top_levels=0)  # strides 8 / 16 / 32: fewer levels, faster compile
  strides = m.strides
  opt = optax.flatten(optax.adam(1e-2))  # one raveled vector: far fewer ops to compile

  gt_boxes, gt_valid = jnp.asarray(gt)[None], jnp.ones((1, 3), bool)

  def loss_fn(p):
    return ph.proposal_loss(m.apply({"params": p}, x), gt_boxes, gt_valid, strides)

  @jax.jit
  def init(rng):
    p = nn.meta.unbox(m.init(rng, x)["params"])
    return p, opt.init(p)

  @jax.jit
  def step(p, state):
    (loss, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
    updates, state = opt.update(g, state, p)
    return optax.apply_updates(p, updates), state, loss, metrics["num_pos"]

  # A Python loop over one jitted step compiles faster on CPU than a lax.scan over it.
  params, state = init(jax.random.PRNGKey(0))
  bias = params["head"]["heatmap"]["bias"]
  losses = []
  for _ in range(60):
    params, state, loss, num_pos = step(params, state)
    losses.append(float(loss))
  out = jax.jit(m.apply)({"params": params}, x)
  boxes, scores, valid = ph.decode_proposals(out["logits"], out["ltrb"], strides, (128, 128),
                                             post_nms_topk=3, iou_threshold=0.5)
  np.testing.assert_allclose(bias, -np.log(99.0), rtol=1e-6)  # heatmap prior 0.01 at init
  assert int(num_pos) == 4  # the 40-half-diagonal box lives on levels 0 and 1
  assert losses[-1] < 0.25 * losses[0]
  assert bool(valid.all())
  iou = box_lib.iou_matrix_np(np.asarray(boxes[0]), gt)
  # The three best proposals are the three boxes, one each.
  assert sorted(iou.argmax(1).tolist()) == [0, 1, 2]
  assert iou.max(0).min() > 0.7, iou
