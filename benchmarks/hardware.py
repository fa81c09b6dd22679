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
