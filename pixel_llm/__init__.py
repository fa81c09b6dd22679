"""PixelLLM in JAX/Flax. `pixel_llm.load(workdir)` returns a model to caption and locate with
(`pixel_llm/api.py`); it is imported on first use, so `import pixel_llm` stays cheap."""


def __getattr__(name):
  if name in ("load", "PixelLLM"):
    from pixel_llm import api
    return getattr(api, name)
  raise AttributeError(f"module 'pixel_llm' has no attribute {name!r}")
