"""What machine a benchmark ran on, for the JSON every benchmark writes."""
import platform


def cpu_name() -> str:
  """The CPU model from /proc/cpuinfo (Linux), else platform.processor()."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def environment() -> dict:
  """Device, backend and versions: the fields every benchmark's JSON starts with."""
  import jax  # pylint: disable=g-import-not-at-top  (hardware.py stays importable without jax)
  return {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
          "jax": jax.__version__, "python": platform.python_version(), "cpu": cpu_name()}


def write_json(path: str, record: dict) -> None:
  """Writes `record` to `path` (folders created); nothing when path is empty."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      json.dump(record, f, indent=2)
