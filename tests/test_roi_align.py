"""RoIAlign (aligned=True) against a direct loop over bins and samples, known answers on a linear
field, and the FPN level rule."""
import numpy as np
import jax.numpy as jnp
import pytest

from pixel_llm.detection import roi_align as roi


def _reference(feature, box, stride, p, g):
  """One box from one map float[H, W, C], written as the detectron2 CPU kernel loops."""
  h, w, c = feature.shape
  x0, y0, x1, y1 = np.asarray(box, np.float64) / stride - 0.5
  bin_h, bin_w = (y1 - y0) / p, (x1 - x0) / p
  out = np.zeros((p, p, c))
  for ph in range(p):
    for pw in range(p):
      acc = np.zeros(c)
      for iy in range(g):
        y = y0 + ph * bin_h + (iy + 0.5) * bin_h / g
        for ix in range(g):
          x = x0 + pw * bin_w + (ix + 0.5) * bin_w / g
          if y < -1.0 or y > h or x < -1.0 or x > w:
            continue
          y, x = max(y, 0.0), max(x, 0.0)
          yl, xl = int(y), int(x)
          if yl >= h - 1:
            yl = yh = h - 1
            y = float(yl)
          else:
            yh = yl + 1
          if xl >= w - 1:
            xl = xh = w - 1
            x = float(xl)
          else:
            xh = xl + 1
          ly, lx = y - yl, x - xl
          acc += ((1 - ly) * (1 - lx) * feature[yl, xl] + (1 - ly) * lx * feature[yl, xh]
                  + ly * (1 - lx) * feature[yh, xl] + ly * lx * feature[yh, xh])
      out[ph, pw] = acc / (g * g)
  return out


def test_linear_field_gives_its_value_at_the_bin_centres():
  h, w = 12, 16
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  feature = np.stack([2.0 * yy + 3.0 * xx + 1.0, -yy + 0.5 * xx], -1).astype(np.float32)
  box = np.array([[24.0, 16.0, 104.0, 80.0]])  # inside the 16x12 grid at stride 8
  got = np.asarray(roi.roi_align([jnp.asarray(feature)], [8], jnp.asarray(box), output_size=4))
  x0, y0, x1, y1 = box[0] / 8 - 0.5
  centres_y = y0 + (np.arange(4) + 0.5) * (y1 - y0) / 4
  centres_x = x0 + (np.arange(4) + 0.5) * (x1 - x0) / 4
  cy, cx = np.meshgrid(centres_y, centres_x, indexing="ij")
  np.testing.assert_allclose(got[0, ..., 0], 2 * cy + 3 * cx + 1, rtol=1e-5)
  np.testing.assert_allclose(got[0, ..., 1], -cy + 0.5 * cx, rtol=1e-5, atol=1e-5)


def test_matches_the_loop_reference_inside_across_and_outside_the_border():
  rng = np.random.default_rng(0)
  feature = rng.normal(size=(9, 11, 3)).astype(np.float32)
  boxes = np.array([[10.0, 12.0, 60.0, 50.0],     # inside
                    [-30.0, -20.0, 40.0, 30.0],   # across the top-left border
                    [150.0, 120.0, 200.0, 170.0],  # across the bottom-right border
                    [180.0, 150.0, 260.0, 230.0],  # beyond the map: zeros
                    [33.0, 33.0, 33.5, 34.0]],    # tiny
                   np.float32)
  got = np.asarray(roi.roi_align([jnp.asarray(feature)], [16], jnp.asarray(boxes), output_size=5,
                                 sampling_ratio=3))
  for i, box in enumerate(boxes):
    np.testing.assert_allclose(got[i], _reference(feature, box, 16, 5, 3), atol=1e-5,
                               err_msg=f"box {box}")
  assert not got[3].any()


def test_fpn_level_rule_and_pooling_from_each_boxs_level():
  strides = (8, 16, 32, 64)
  sides = np.array([50.0, 112.0, 224.0, 447.0, 448.0, 2000.0])
  boxes = np.stack([np.zeros(6), np.zeros(6), sides, sides], -1).astype(np.float32)
  # floor(4 + log2(side / 224)) clamped to levels 3..6 -> index into strides.
  np.testing.assert_array_equal(np.asarray(roi.assign_levels(jnp.asarray(boxes), strides)),
                                [0, 0, 1, 1, 2, 3])
  rng = np.random.default_rng(1)
  levels = [rng.normal(size=(64 // s * 4, 64 // s * 4, 2)).astype(np.float32) for s in strides]
  query = np.array([[4.0, 6.0, 60.0, 50.0], [10.0, 8.0, 250.0, 240.0], [0.0, 0.0, 100.0, 130.0]],
                   np.float32)
  got = np.asarray(roi.roi_align([jnp.asarray(l) for l in levels], strides, jnp.asarray(query)))
  which = np.asarray(roi.assign_levels(jnp.asarray(query), strides))
  assert len(set(which.tolist())) > 1  # the boxes really come from different levels
  for i, k in enumerate(which):
    np.testing.assert_allclose(got[i], _reference(levels[k], query[i], strides[k], 7, 2),
                               atol=1e-5)


def test_bad_input():
  f = [jnp.zeros((4, 4, 1))]
  with pytest.raises(ValueError, match="one per level"):
    roi.roi_align(f, [8, 16], jnp.zeros((1, 4)))
  with pytest.raises(ValueError, match=r"\[N, 4\]"):
    roi.roi_align(f, [8], jnp.zeros((4,)))
  with pytest.raises(ValueError, match="powers of two"):
    roi.assign_levels(jnp.zeros((1, 4)), (8, 12))
