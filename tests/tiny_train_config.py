"""A tiny `configs/ln.py:toy` for the trainer's tests (not a test module; run as a config file).

  python -m pixel_llm.train --config=tests/tiny_train_config.py --config.data.root=DIR --workdir=W

64 px images, 24 training images, batch 4 over data=4 x tensor=2, 8 steps, no evaluation, one
layer per tower (`shallow`).

`shallow(config)` is also what the other end-to-end tests use: their cost is compile time, which
grows with the number of unrolled layers. SAM's windowed blocks and deeper stacks are covered by
the towers' own tests (test_sam_image_encoder.py, test_eva02.py, test_t5.py, test_scan_layers.py).
"""
from configs import ln


def shallow(c):
  """One layer in each tower of a toy config (SAM's one block global; T5 one encoder and one
  decoder layer); returns `c`."""
  c.model.sam.update(depth=1, global_attn_indexes=(0,))
  c.model.eva02.depth = c.model.prompt_extractor.depth = 1
  c.model.t5.num_layers = c.model.t5.num_decoder_layers = 1
  # With one block per tower, the parts tensor parallelism leaves whole (SAM's neck, norms,
  # position tables) are over half the bytes: the default 0.5 limit would stop a tensor=2 mesh.
  c.max_replicated_fraction = 0.75
  return c


def get_config(arg: str | None = None):
  del arg
  c = shallow(ln.get_config("toy"))
  c.model.image_size = 64
  c.data.update(num_train_images=24, num_val_images=4, image_size=64, eval_batch_size=4)
  c.input.max_target_len = 12
  c.update(total_steps=8, batch_size=4, warmup_steps=2, log_every_steps=1,
           checkpoint_every_steps=4, eval_every_steps=1000, final_eval=False)
  # Blocking saves: a checkpoint is complete on disk when the next step starts, so the tests can
  # interrupt a run at a known point.
  c.async_checkpoints = False
  c.mesh = dict(data=4, fsdp=1, tensor=2)  # 8 devices: one process x 8 or two x 4
  return c
