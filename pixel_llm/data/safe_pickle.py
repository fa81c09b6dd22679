"""Loads pickles that may only hold plain data: the RefCOCO `refs(*).p` files.

`pickle.load` runs whatever a pickle names (any importable callable, e.g. `os.system`), so a
downloaded pickle is code. The unpickler here resolves no global at all and has no persistent-id
hook: only the pickle opcodes for containers and scalars (list, dict, tuple, str, bytes, int,
float, bool, None; sets from protocol 4 on) work, and anything else stops the load with
`UnsafePickleError` before it runs. That is all the refs files need (lists of dicts of str / int /
float / list).

The refs files are Python 2 pickles. Their `str` values are bytes, read here as bytes and then
decoded as UTF-8 (Latin-1 when that fails), so non-ASCII text survives; dict keys are decoded the
same way.
"""
import io
import pickle
from typing import Any


class PickleLoadError(ValueError):
  """A pickle that cannot be loaded; the message names the file."""


class UnsafePickleError(PickleLoadError):
  """The pickle names a global (a class or function) or a persistent id: refused, not run."""


class _Refused(pickle.UnpicklingError):
  pass


class _PlainDataUnpickler(pickle.Unpickler):

  def find_class(self, module: str, name: str):
    raise _Refused(f"it refers to the global {module}.{name}; only plain containers and scalars "
                   "are allowed")

  def persistent_load(self, pid):
    raise _Refused(f"it holds a persistent id ({str(pid)[:40]!r})")


def _text(b: bytes) -> str:
  try:
    return b.decode("utf-8")
  except UnicodeDecodeError:
    return b.decode("latin-1")


def _decode_bytes(obj: Any) -> Any:
  """Python 2 `str` (bytes here) -> str, inside containers too."""
  if isinstance(obj, bytes):
    return _text(obj)
  if isinstance(obj, list):
    return [_decode_bytes(v) for v in obj]
  if isinstance(obj, dict):
    return {_decode_bytes(k): _decode_bytes(v) for k, v in obj.items()}
  if isinstance(obj, tuple):
    return tuple(_decode_bytes(v) for v in obj)
  if isinstance(obj, (set, frozenset)):
    return type(obj)(_decode_bytes(v) for v in obj)
  return obj


def loads(data: bytes, name: str = "<bytes>") -> Any:
  """Plain data of a pickle (any protocol, Python 2 or 3); raises PickleLoadError naming `name`."""
  try:
    obj = _PlainDataUnpickler(io.BytesIO(data), encoding="bytes").load()
  except _Refused as e:
    raise UnsafePickleError(f"{name}: unsafe pickle refused (nothing was run): {e}") from None
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
          AttributeError, OverflowError, MemoryError) as e:
    raise PickleLoadError(f"{name}: not a readable pickle: {type(e).__name__}: {e}") from None
  return _decode_bytes(obj)


def load(path: str) -> Any:
  """Plain data of the pickle file at `path` (see `loads`)."""
  with open(path, "rb") as f:
    data = f.read()
  return loads(data, path)
