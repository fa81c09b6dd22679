"""Crash safety of the training binary, run as real processes on a tiny config: SIGTERM saves at
the current step and exits 0, kill -9 loses only the steps since the last checkpoint, and rerunning
the same command continues with bitwise the losses of an uninterrupted run (train state and input
position both restored); two processes x 4 devices (jax.distributed over localhost) give the
losses of one process x 8."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "tests", "tiny_train_config.py")
pytestmark = pytest.mark.slow


def _env(tmp, devices: int) -> dict:
  env = dict(os.environ)
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu",  # with libtpu installed (AOT tool), jax would probe for TPUs
             PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
             # The runs compile the same programs: share them through jax's persistent cache.
             JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def _start(tmp, workdir, devices=8, extra=()):
  cmd = [sys.executable, "-m", "pixel_llm.train", f"--config={CONFIG}",
         f"--config.data.root={tmp / 'world'}", f"--workdir={workdir}", *extra]
  log = open(str(workdir) + ".log", "ab")
  return subprocess.Popen(cmd, cwd=REPO, env=_env(tmp, devices), stdout=log,
                          stderr=subprocess.STDOUT)


def _finish(proc, workdir, timeout=600):
  rc = proc.wait(timeout=timeout)
  out = open(str(workdir) + ".log").read()
  assert rc == 0, out[-3000:]
  return out


def _losses(workdir) -> dict[int, float]:
  """step -> loss; a step logged twice (before a crash and after the restart) keeps the last."""
  out = {}
  with open(os.path.join(workdir, "train_metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      out[r["step"]] = r["loss"]
  return out


def _wait_for_step(proc, workdir, step, checkpoint=None, timeout=600):
  """Until `step` is logged (and, if given, the checkpoint of that step is complete on disk)."""
  path = os.path.join(workdir, "train_metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, open(str(workdir) + ".log").read()[-3000:]
    if (os.path.exists(path) and any(json.loads(l)["step"] >= step for l in open(path) if l.strip())
        and (checkpoint is None or os.path.isdir(os.path.join(workdir, "checkpoints",
                                                              str(checkpoint))))):
      return
    time.sleep(0.05)
  raise TimeoutError(f"step {step} not reached")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run: one process, 8 devices, 8 steps."""
  tmp = tmp_path_factory.mktemp("resume")
  workdir = tmp / "uninterrupted"
  _finish(_start(tmp, workdir), workdir)
  return tmp, _losses(workdir)


def test_sigterm_then_kill_9_then_rerun_matches_uninterrupted_run_bitwise(reference):
  """One workdir through both interruptions (each run costs a process start): SIGTERM at step >= 2
  saves that step and exits 0; the rerun resumes there; kill -9 once checkpoint 4 is complete;
  the rerun resumes at 4 and finishes. Every step's loss equals the uninterrupted run's."""
  tmp, expected = reference
  assert sorted(expected) == list(range(1, 9))
  workdir = tmp / "interrupted"

  proc = _start(tmp, workdir)
  _wait_for_step(proc, workdir, 2)
  proc.send_signal(signal.SIGTERM)
  out = _finish(proc, workdir)
  step = int(out.split("SIGTERM: saved a checkpoint at step ")[1].split(";")[0])
  assert 2 <= step < 8
  assert str(step) in os.listdir(workdir / "checkpoints") and max(_losses(workdir)) == step

  proc = _start(tmp, workdir)
  _wait_for_step(proc, workdir, 5, checkpoint=4)  # checkpoints every 4 steps (orbax renames a
  proc.kill()                                      # checkpoint into place once it is complete)
  proc.wait()
  before = _losses(workdir)
  assert 5 <= max(before) < 8

  out = _finish(_start(tmp, workdir), workdir)
  assert out.count("Resumed from ") == 2  # after SIGTERM and after kill -9
  assert f"at step {step}" in out and "at step 4" in out.split("Resumed from ")[-1]
  assert "skipped 4/4 batches already trained on" in out  # the input fast-forwarded
  got = _losses(workdir)
  assert sorted(got) == list(range(1, 9))
  assert got == expected  # bitwise: same floats, every step, before and after the restarts


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(reference):
  tmp, expected = reference
  address = f"localhost:{_free_port()}"
  workdir = tmp / "two_processes"
  procs = [_start(tmp, workdir, devices=4,
                  extra=(f"--coordinator_address={address}", "--num_processes=2",
                         f"--process_id={i}")) for i in range(2)]
  for p in procs:
    _finish(p, workdir)
  got = _losses(workdir)  # written by process 0 only
  assert sorted(got) == sorted(expected)
  for step in expected:  # different collectives (gloo across processes): equal up to rounding
    assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
