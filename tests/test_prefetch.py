"""Tests of pixel_llm/prefetch.py (background prefetching of input batches).

  JAX_PLATFORMS=cpu python -m pytest -q tests/test_prefetch.py
"""
import gc
import itertools
import threading
import time
import traceback

import pytest

from pixel_llm.prefetch import prefetch_to_device


def _wait_dead(thread: threading.Thread, timeout: float = 5.0) -> bool:
  thread.join(timeout)
  return not thread.is_alive()


@pytest.mark.parametrize("size", [1, 2, 5])
def test_order_preserved_and_put_applied(size):
  with prefetch_to_device(range(20), size, lambda x: {"x": x * 10}) as it:
    assert [b["x"] for b in it] == [x * 10 for x in range(20)]


def test_size_zero_is_a_plain_map_without_thread():
  before = threading.active_count()
  it = prefetch_to_device(iter(range(7)), 0, lambda x: x + 1)
  assert threading.active_count() == before
  assert list(it) == list(map(lambda x: x + 1, range(7)))
  with pytest.raises(ValueError):
    prefetch_to_device(range(3), -1, lambda x: x)


def _failing_source():
  yield 1
  yield 2
  raise ValueError("broken record 3")


@pytest.mark.parametrize("size", [0, 2])
def test_producer_exception_surfaces_in_consumer(size):
  it = prefetch_to_device(_failing_source(), size, lambda x: x)
  assert next(it) == 1 and next(it) == 2
  with pytest.raises(ValueError, match="broken record 3") as info:
    next(it)
  # The producer's frames are in the traceback: where the record broke, not just where it surfaced.
  text = "".join(traceback.format_exception(info.value))
  assert "_failing_source" in text
  with pytest.raises(StopIteration):  # a failed prefetcher stays finished
    next(it)


def test_put_exception_surfaces_in_consumer():
  def put(x):
    if x == 3:
      raise KeyError("no sharding")
    return x
  with prefetch_to_device(range(10), 2, put) as it:
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(KeyError):
      next(it)


def test_stop_iteration_ends_and_thread_exits():
  it = prefetch_to_device(iter([1, 2]), 3, lambda x: x)
  assert list(it) == [1, 2]
  with pytest.raises(StopIteration):
    next(it)
  assert _wait_dead(it.thread)


def test_close_stops_pulling():
  pulled = []

  def source():
    for i in itertools.count():
      pulled.append(i)
      yield i

  it = prefetch_to_device(source(), 2, lambda x: x)
  assert next(it) == 0
  it.close()
  assert _wait_dead(it.thread)
  n = len(pulled)
  assert n <= 4  # 1 consumed + at most 2 waiting (+1 being pulled when the slot freed)
  time.sleep(0.2)
  assert len(pulled) == n
  with pytest.raises(StopIteration):
    next(it)


def test_context_manager_and_garbage_collection_stop_the_thread():
  with prefetch_to_device(itertools.count(), 2, lambda x: x) as it:
    assert next(it) == 0
  assert _wait_dead(it.thread)

  it = prefetch_to_device(itertools.count(), 2, lambda x: x)
  next(it)
  thread = it.thread
  assert thread.daemon  # never keeps the process alive
  del it
  gc.collect()
  assert _wait_dead(thread)


def test_producer_and_consumer_overlap():
  # Serial: 10 x (50 ms producing + 50 ms consuming) = 1.0 s. Overlapped: about 0.55 s. Sleeps use
  # no CPU, so a loaded machine slows this little; 0.8 s leaves room and still fails if serial.
  def slow_put(x):
    time.sleep(0.05)
    return x

  t0 = time.perf_counter()
  with prefetch_to_device(range(10), 2, slow_put) as it:
    out = []
    for x in it:
      time.sleep(0.05)
      out.append(x)
  elapsed = time.perf_counter() - t0
  assert out == list(range(10))
  assert elapsed < 0.8, elapsed

  # The same work without prefetching is serial: the comparison above is meaningful.
  t0 = time.perf_counter()
  for x in prefetch_to_device(range(10), 0, slow_put):
    time.sleep(0.05)
  assert time.perf_counter() - t0 >= 0.95
