"""Prefetches input batches onto the devices on a background thread.

  with prefetch_to_device(train_iter, 2, global_batch) as batches:
    for batch in batches: state, metrics = step_fn(state, batch)

Why: the trainer's loop called `next(train_iter)` (host decoding, augmentation, tokenisation) and
then the host-to-device transfer synchronously between steps, so the device sat idle for both. JAX
dispatches the step asynchronously, so a thread that prepares and transfers the next batches while
the current step runs hides that time. Tests: tests/test_prefetch.py; measured speed-up:
benchmarks/speed_changes.py (item h).

The producer thread pulls host batches from the iterator, applies `put` (in the trainer
`jax.make_array_from_process_local_data` onto the batch sharding) and keeps at most `size` put
batches waiting, so at most `size` extra batches occupy device memory. Order is preserved; an
exception of the iterator or of `put` is re-raised by the consumer's `next` (the same exception
object, whose traceback still shows the producer's frames); exhaustion ends the consumer's
iteration. The thread is a daemon and stops pulling once the consumer is closed (`close()`, the
`with` block's end) or garbage-collected.
"""
import queue
import threading
import weakref
from typing import Any, Callable, Iterable, Iterator

# Producer -> consumer messages: (kind, payload).
_ITEM, _ERROR, _END = "item", "error", "end"
# How often a blocked producer checks whether the consumer has gone (seconds).
_POLL_S = 0.05


class _Mapped:
  """size 0: `put` applied lazily in the consumer's thread (no thread, the old behaviour)."""

  def __init__(self, iterator: Iterable[Any], put: Callable[[Any], Any]):
    self._it, self._put, self._closed = iter(iterator), put, False

  def __iter__(self):
    return self

  def __next__(self):
    if self._closed:
      raise StopIteration
    return self._put(next(self._it))

  def close(self) -> None:
    self._closed = True

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _produce(it: Iterator[Any], put: Callable[[Any], Any], out: queue.Queue,
             slots: threading.Semaphore, stop: threading.Event) -> None:
  """The thread's body. Holds no reference to the consumer object, so that it can be collected."""
  try:
    while True:
      # A free slot first: it bounds the put (device-resident) batches waiting to `size`.
      while not slots.acquire(timeout=_POLL_S):
        if stop.is_set():
          return
      if stop.is_set():
        return
      try:
        item = next(it)
      except StopIteration:
        out.put((_END, None))
        return
      out.put((_ITEM, put(item)))
  except BaseException as e:  # pylint: disable=broad-except
    out.put((_ERROR, e))


class _Prefetcher:
  """The consumer side of `prefetch_to_device` with size > 0."""

  def __init__(self, iterator: Iterable[Any], size: int, put: Callable[[Any], Any]):
    self._queue = queue.Queue()
    self._slots = threading.Semaphore(size)
    self._stop = threading.Event()
    self._done = False
    self.thread = threading.Thread(
        target=_produce, args=(iter(iterator), put, self._queue, self._slots, self._stop),
        name="prefetch_to_device", daemon=True)
    # Garbage collection of the consumer stops the producer too (it polls `stop`).
    self._finalizer = weakref.finalize(self, self._stop.set)
    self.thread.start()

  def __iter__(self):
    return self

  def __next__(self):
    if self._done:
      raise StopIteration
    kind, value = self._queue.get()
    if kind == _ITEM:
      self._slots.release()
      return value
    self._done = True
    self._stop.set()
    if kind == _END:
      raise StopIteration
    raise value  # the producer's exception, its traceback (producer frames) kept

  def close(self, timeout: float | None = 1.0) -> None:
    """Stops the producer; waits up to `timeout` s for it (it may be inside the iterator's next)."""
    self._done = True
    self._stop.set()
    self.thread.join(timeout)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def prefetch_to_device(iterator: Iterable[Any], size: int,
                       put: Callable[[Any], Any]) -> _Prefetcher | _Mapped:
  """Iterates `put(x)` for x in `iterator`, with up to `size` of them prepared ahead on a thread.

  size 0: no thread, `put` runs in the caller's thread at each `next` (a plain map). The result
  has `close()` and is a context manager; close it (or let it be collected) to stop the thread.
  """
  if size < 0:
    raise ValueError(f"prefetch size must be >= 0, not {size}")
  if size == 0:
    return _Mapped(iterator, put)
  return _Prefetcher(iterator, size, put)
