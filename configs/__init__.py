"""ml_collections configs for pixel_llm binaries (`--config=configs/<file>.py:<arg>`)."""
