"""Preemption and damaged checkpoints (issue #22): signals, failed saves, early failures, fallbacks.

The end-to-end tests stop ``python -m jaxembed.train --config configs/digits.py:smoke`` (18
steps; stage ends 6, 12, 18; checkpoints every 4 steps; a line every 2) with a signal in stage
3, resume it, and compare the embeddings with the uninterrupted run of conftest's
``smoke_run``: a resumed run must end exactly as if it had never stopped.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxembed.configs import digits
from jaxembed import api
from jaxembed import checkpoint
from jaxembed import export
from jaxembed import preempt
from jaxembed import runs
from jaxembed import train_state
from jaxembed import train_step
from jaxembed import trainer
from jaxembed import workdir as workdir_lib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SMOKE = ["--config", "configs/digits.py:smoke"]
STOP_LINE = re.compile(r"^stopped at step (\d+) of 18; checkpoint saved in (\S+); "
                       r"run the same command to resume$")


def cli_env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the machine's real devices, as smoke_run
  return env


def train(*args, script=("-m", "jaxembed.train")):
  return subprocess.run([sys.executable, *script, *SMOKE, *args], cwd=REPO, env=cli_env(),
                        capture_output=True, text=True, timeout=600)


def assert_same_embeddings(workdir, reference):
  got, want = np.load(workdir / "embeddings.npz"), np.load(reference / "embeddings.npz")
  for key in ("embedding", "head", "features"):
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def listing(path):
  """Every file and folder under ``path``, relative to it."""
  return sorted(os.path.relpath(os.path.join(root, n), path)
                for root, dirs, files in os.walk(path) for n in dirs + files)


def truncate(path, fraction=3):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // fraction)


# ------------------------------------------------------------------- StopRequest


def test_a_signal_before_training_stops_at_once():
  with preempt.StopRequest() as stop:
    with pytest.raises(preempt.Stopped) as e:
      os.kill(os.getpid(), signal.SIGTERM)
      for _ in range(10_000):  # Python runs the handler between bytecodes
        pass
  assert e.value.status == 143 and e.value.step is None and stop.signum == signal.SIGTERM
  assert str(e.value) == ("stopped before training started (SIGTERM); nothing was trained in "
                          "this invocation, so there is nothing new to save")


def test_during_training_signals_are_recorded_and_the_handlers_restored(capfd):
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  with preempt.StopRequest() as stop:
    stop.defer(0)
    assert not stop.should_stop(1)
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.should_stop(2)
    assert stop.signum == signal.SIGINT and stop.repeated == [signal.SIGTERM]
    stopped = stop.stopped(2, 9, "/w/checkpoints")
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
  assert stopped.status == 130 and stopped.step == 2
  assert str(stopped) == ("stopped at step 2 of 9; checkpoint saved in /w/checkpoints; run the "
                          "same command to resume")
  assert capfd.readouterr().err == "SIGTERM received again: already stopping, please wait\n"


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("service, signum", [(True, signal.SIGTERM), (False, signal.SIGINT)])
def test_two_processes_stop_at_the_same_step(tmp_path, service, signum):
  """Only process 1 is signalled; both stop at one step, save it once and exit alike.

  With JAX's preemption service (the default) SIGTERM goes to the runtime's handler; without
  it the processes compare flags every 2 steps and process 0 takes process 1's signal.
  """
  port, ckdir = free_port(), tmp_path / "checkpoints"
  procs = []
  for i in range(2):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAXEMBED_")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               JAXEMBED_COORDINATOR=f"127.0.0.1:{port}", JAXEMBED_NUM_PROCESSES="2",
               JAXEMBED_PROCESS_ID=str(i),
               JAX_ENABLE_PREEMPTION_SERVICE="true" if service else "false")
    procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "preempt_worker.py"),
                                   str(ckdir)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  try:
    seen = []
    for line in procs[1].stdout:
      seen.append(line)
      if line == "step 20\n":
        procs[1].send_signal(signum)
        break
    outputs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outputs[1] = "".join(seen) + outputs[1]
  assert all(f"preemption service: {service}\n" in out for out in outputs), outputs
  # The service tells no signal: a stop it agreed on is a SIGTERM's.
  status = 143 if service else 128 + signum
  assert [p.returncode for p in procs] == [status, status], outputs
  stops = [re.findall(r"^stopped at step (\d+)$", out, re.M) for out in outputs]
  assert stops[0] == stops[1] and len(stops[0]) == 1, outputs
  step = int(stops[0][0])
  assert step >= 20
  assert "Traceback" not in "".join(outputs)
  # One checkpoint, at that step, with the state both processes had reached.
  assert sorted(os.listdir(ckdir)) == [str(step)]
  with checkpoint.closing(checkpoint.open_manager(str(ckdir))) as manager:
    target = {"w": jnp.zeros((16,), jnp.float32), "step": jnp.asarray(0, jnp.int32)}
    restored = checkpoint.restore(manager, step, target)
  assert int(restored["step"]) == step


def test_a_stopped_fit_says_how_to_resume_in_the_estimators_words(tmp_path, monkeypatch):
  def stopped(config, workdir):
    ckdir = os.path.join(os.path.abspath(workdir), "checkpoints")
    raise preempt.Stopped(signal.SIGINT, f"stopped at step 5 of 9; checkpoint saved in {ckdir}; "
                          "run the same command to resume", 5, 9, ckdir)

  monkeypatch.setattr(trainer, "train_and_evaluate", stopped)
  images = np.random.default_rng(0).integers(0, 255, (16, 8, 8), dtype=np.uint8)
  workdir = str(tmp_path / "w")
  with pytest.raises(preempt.Stopped) as e:
    api.TSimCNE(workdir=workdir).fit(images)
  assert e.value.status == 130 and e.value.step == 5
  assert str(e.value) == (f"fit stopped by SIGINT at step 5 of 9; the checkpoint is saved in "
                          f"{workdir}/checkpoints: call fit() again with the same images and "
                          f"workdir={workdir!r} to resume")
  with pytest.raises(preempt.Stopped, match=r"^fit stopped by SIGINT at step 5 of 9; it ran in a "
                     "temporary workdir, so it cannot be resumed: pass workdir="):
    api.TSimCNE().fit(images)


# ----------------------------------------------------------- the first-step guard


def test_the_guard_removes_only_what_it_created(tmp_path):
  new = tmp_path / "new"
  with pytest.raises(RuntimeError):
    with workdir_lib.FirstStepGuard(str(new)):
      new.mkdir()
      (new / "config.json").write_text("{}")
      raise RuntimeError("a bad model option")
  assert not new.exists()

  old = tmp_path / "old"
  (old / "checkpoints").mkdir(parents=True)
  (old / "notes.txt").write_text("mine")
  with pytest.raises(preempt.Stopped):
    with workdir_lib.FirstStepGuard(str(old)):
      (old / "config.json").write_text("{}")
      (old / "checkpoints" / "damaged").mkdir()  # inside an old entry: kept
      (old / "events").mkdir()
      raise preempt.Stopped(signal.SIGTERM, "stopped before training started")
  assert listing(old) == ["checkpoints", "checkpoints/damaged", "notes.txt"]

  with workdir_lib.FirstStepGuard(str(old)) as guard:
    (old / "config.json").write_text("{}")
    guard.commit()
    with pytest.raises(RuntimeError):  # after the commit the run's files stay
      with workdir_lib.FirstStepGuard(str(old)) as inner:
        inner.commit()
        raise RuntimeError("a data error in step 500")
  assert "config.json" in os.listdir(old)


def smoke_config(**changes):
  c = digits.get_config("smoke")
  for key, value in changes.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def test_a_bad_model_option_leaves_no_new_workdir(tmp_path):
  with pytest.raises(ValueError, match="stem"):
    trainer.train_and_evaluate(smoke_config(**{"model.stem": "bogus"}), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_unreadable_weights_leave_the_workdir_as_it_was(tmp_path):
  (tmp_path / "w").mkdir()
  (tmp_path / "w" / "notes.txt").write_text("mine")
  with pytest.raises((ValueError, OSError), match="nonexistent"):
    trainer.train_and_evaluate(smoke_config(**{"model.pretrained": "/nonexistent/weights.npz"}),
                               str(tmp_path / "w"))
  assert listing(tmp_path / "w") == ["notes.txt"]


@pytest.mark.slow
def test_a_resumed_run_failing_in_its_first_step_changes_nothing(smoke_run, tmp_path,
                                                                monkeypatch):
  """Resumed from step 16 (18 set aside by hand), the first step fails: the workdir is as it
  was, and the resumed run did not ask for pretrained weights."""
  reference, first = smoke_run
  assert first.returncode == 0, first.stderr[-3000:]
  workdir = tmp_path / "w"
  shutil.copytree(reference, workdir)
  shutil.rmtree(workdir / "checkpoints" / "18")
  (workdir / "metrics.json").unlink()
  before = listing(workdir)

  def failing_step(*args, **kwargs):
    def step(*a):
      raise RuntimeError("a data error found in the first step")
    return step

  calls = []
  setup_stage = train_state.setup_stage
  monkeypatch.setattr(train_step, "make_train_step", failing_step)
  monkeypatch.setattr(train_state, "setup_stage", lambda *a, **kw: calls.append(
      kw.get("load_pretrained")) or setup_stage(*a, **kw))
  with pytest.raises(RuntimeError, match="first step"):
    trainer.train_and_evaluate(smoke_config(), str(workdir))
  assert listing(workdir) == before  # no new events file, nothing moved
  assert calls == [False]


# ------------------------------------------------------------- damaged checkpoints


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_intact_checkpoint_says_how_to_start_over(smoke_run, tmp_path):
  reference, first = smoke_run
  assert first.returncode == 0, first.stderr[-3000:]
  workdir = tmp_path / "w"
  shutil.copytree(reference, workdir)
  (workdir / "metrics.json").unlink()
  steps = sorted(os.listdir(workdir / "checkpoints"), key=int)
  for step in steps:
    truncate(workdir / "checkpoints" / step / "default" / "_METADATA")
  before = listing(workdir)
  with pytest.raises(checkpoint.NoIntactCheckpoint) as e:
    trainer.train_and_evaluate(smoke_config(), str(workdir))
  ckdir = workdir / "checkpoints"
  assert str(e.value).startswith(f"none of the {len(steps)} checkpoints in {ckdir} can be read "
                                 f"(steps {', '.join(steps)}; the newest: JSONDecodeError: ")
  assert str(e.value).endswith(f"to start over, use a new --workdir or move {ckdir} away")
  assert listing(workdir) == before


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_export_uses_the_newest_intact_checkpoint_and_says_so(smoke_run, tmp_path, capsys):
  reference, first = smoke_run
  assert first.returncode == 0, first.stderr[-3000:]
  workdir = tmp_path / "w"
  shutil.copytree(reference, workdir)
  truncate(workdir / "checkpoints" / "18" / "default" / "array_metadatas" / "process_0")
  before = listing(workdir)
  _, variables, _, step = runs.load_trained(str(workdir))
  assert step == 16
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(
      f"warning: the checkpoint at step 18 ({workdir}/checkpoints/18) cannot be read "
      "(JSONDecodeError: ")
  assert err[0].endswith("); using step 16, the newest intact one")
  # The values of checkpoint 16 itself.
  with checkpoint.closing(checkpoint.open_manager(str(reference / "checkpoints"))) as manager:
    want = manager.restore(16)["params"]
  for got_leaf, want_leaf in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(got_leaf), np.asarray(want_leaf))

  export.export(str(workdir), out=str(tmp_path / "out" / "e.npz"), plots=False, tables=False)
  assert re.search(r"^Embedded \d+ images with the checkpoint at step 16\.$",
                   capsys.readouterr().out, re.M)
  assert listing(workdir) == before  # export only reads: nothing set aside
  with pytest.raises(checkpoint.DamagedCheckpoint, match="step 18"):
    runs.load_trained(str(workdir), step=18)  # an explicit step gets no substitute


# ------------------------------------------------------------ signals, end to end


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
  """A smoke run sent SIGTERM, then SIGINT 50 ms later, while in stage 3.

  Returns (workdir, returncode, stdout, stderr, seconds from the signal to the exit).
  """
  workdir = tmp_path_factory.mktemp("stopped") / "run"
  proc = subprocess.Popen([sys.executable, "-m", "jaxembed.train", *SMOKE, "--workdir",
                           str(workdir)], cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  seen, signalled = [], None
  for line in proc.stdout:
    seen.append(line)
    if line.startswith("stage 3/3 | step 14/"):
      signalled = time.time()
      proc.send_signal(signal.SIGTERM)
      time.sleep(0.05)
      proc.send_signal(signal.SIGINT)  # while it saves: must change nothing
      break
  out, err = proc.communicate(timeout=300)
  return workdir, proc.returncode, "".join(seen) + out, err, time.time() - (signalled or 0)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_in_stage_3_saves_the_step_reached_and_resumes_bit_identical(
    stopped, smoke_run, tmp_path):
  workdir, code, out, err, seconds = stopped
  print(f"SIGTERM to exit: {seconds:.1f} s")
  assert code == 143, (out[-2000:], err[-3000:])
  assert "Traceback" not in err and "Traceback" not in out
  assert "SIGINT received again: already stopping, please wait" in err
  last = STOP_LINE.match(err.strip().splitlines()[-1])
  assert last, err[-2000:]
  step = int(last.group(1))
  assert last.group(2) == str(workdir / "checkpoints") and 14 <= step < 18
  assert str(step) in os.listdir(workdir / "checkpoints")
  assert not (workdir / "metrics.json").exists()

  resumed_dir = tmp_path / "run"
  shutil.copytree(workdir, resumed_dir)
  resumed = train("--workdir", str(resumed_dir))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resuming from the checkpoint at step {step} (stage 3)." in resumed.stdout
  reference, first = smoke_run
  assert first.returncode == 0, first.stderr[-3000:]
  assert_same_embeddings(resumed_dir, reference)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_failed_save_then_a_torn_newest_checkpoint_then_resume_is_bit_identical(
    stopped, smoke_run, tmp_path):
  """From the stopped run: the disk fills at the next save (one line, exit 2, the earlier
  checkpoints intact); then the newest checkpoint's files are truncated; the run after that
  removes the unfinished save, sets the torn checkpoint aside, resumes from the one before and
  ends as the uninterrupted run."""
  source, code, _, err, _ = stopped
  assert code == 143, err[-3000:]
  stop_step = int(STOP_LINE.match(err.strip().splitlines()[-1]).group(1))
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  ckdir = workdir / "checkpoints"
  full_at = 16 if stop_step < 16 else 18
  failed = train("--workdir", str(workdir), script=(os.path.join(HERE, "full_disk.py"),
                                                    str(full_at)))
  assert failed.returncode == 2, failed.stderr[-3000:]
  assert "Traceback" not in failed.stderr
  assert failed.stderr.strip().splitlines()[-1] == (
      f"error: cannot save the checkpoint in {ckdir}/{full_at}: No space left on device (errno "
      f"ENOSPC); the checkpoints before it are intact (newest: step {stop_step}). Free space or "
      "fix the permissions, then run the same command to resume")
  assert sorted(os.listdir(ckdir)) == sorted(["6", "12", str(stop_step),
                                              f"{full_at}.orbax-checkpoint-tmp"])
  # A torn write of the newest checkpoint: its files cut short.
  for name in ("_CHECKPOINT_METADATA", "default/_METADATA"):
    truncate(ckdir / str(stop_step) / name)

  resumed = train("--workdir", str(workdir))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Removed {ckdir}/{full_at}.orbax-checkpoint-tmp, an unfinished save" in resumed.stdout
  warning = [l for l in resumed.stderr.splitlines() if l.startswith("warning:")]
  assert warning == [
      f"warning: the checkpoint at step {stop_step} ({ckdir}/{stop_step}) cannot be read "
      f"(_CHECKPOINT_METADATA: {warning[0].split('_CHECKPOINT_METADATA: ')[1].split(');')[0]}); "
      f"moved it to {ckdir}/damaged/{stop_step}; using step 12, the newest intact one"], \
      resumed.stderr[-3000:]
  assert "JSONDecodeError" in warning[0]
  assert "Resuming from the checkpoint at step 12 (stage 2)." in resumed.stdout
  assert os.listdir(ckdir / "damaged") == [str(stop_step)]
  reference, _ = smoke_run
  assert_same_embeddings(workdir, reference)


@pytest.mark.slow
def test_a_cli_failure_before_the_first_step_is_one_line_and_removes_the_new_workdir(tmp_path):
  """A bad model option: exit 2, one line, no traceback (none from Orbax's threads either),
  no workdir left to refuse the corrected command."""
  workdir = tmp_path / "w"
  proc = train("--workdir", str(workdir), "--config.model.stem=bogus")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown stem 'bogus'")
  assert "Traceback" not in proc.stderr and "schedule new futures" not in proc.stderr
  assert not workdir.exists()
