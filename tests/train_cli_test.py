"""End-to-end tests of ``jaxembed train``: outputs, resume, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(*args, timeout=600):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the CLI runs on the machine's real devices
  return subprocess.run([sys.executable, "-m", "jaxembed.train", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


# What TensorFlow prints when it is imported (its C++ start-up lines, absl's preamble).
FOREIGN = ("oneDNN", "absl::InitializeLog", "cpu_feature_guard", "tensorflow", "port.cc")


@pytest.mark.slow
def test_smoke_run_writes_every_workdir_file(smoke_run):
  workdir, proc = smoke_run
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("config.json", "metrics.json", "embeddings.npz", "embeddings.csv",
               "embedding.png", "embedding.html"):
    assert (workdir / name).is_file(), name
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  assert os.listdir(workdir / "checkpoints")

  config = json.loads((workdir / "config.json").read_text())
  assert config["run"]["format_version"] == 1
  assert len(config["run"]["data_hash"]) == 64
  assert len(config["model"]["input_mean"]) == 1   # digits are gray
  assert len(config["run"]["data_stats"]["border_mean"]) == 1

  metrics = json.loads((workdir / "metrics.json").read_text())
  assert metrics["protocol"] == "split"
  assert 0.0 <= metrics["knn_accuracy"] <= 1.0
  assert -1.0 <= metrics["silhouette"] <= 1.0
  assert [s["head_dim"] for s in metrics["stages"]] == [128, 2, 2]

  data = np.load(workdir / "embeddings.npz")
  n = config["run"]["num_train"] + config["run"]["num_test"]
  assert data["embedding"].shape == (n, 2) and data["embedding"].dtype == np.float32
  assert data["head"].shape == (n, 2)
  assert data["features"].shape[0] == n
  assert data["labels"].shape == (n,)
  assert sorted(set(data["split"].tolist())) == ["test", "train"]
  assert len(set(data["ids"].tolist())) == n
  assert np.isfinite(data["embedding"]).all()
  lines = (workdir / "embeddings.csv").read_text().splitlines()
  assert lines[0].startswith("id,split,label,x,y") and len(lines) == n + 1

  # The metrics are those of the stored embedding: recompute with scikit-learn.
  from sklearn import metrics as skm, neighbors
  tr, te = data["split"] == "train", data["split"] == "test"
  knn = neighbors.KNeighborsClassifier(15).fit(data["embedding"][tr], data["labels"][tr])
  assert metrics["knn_accuracy"] == pytest.approx(
      knn.score(data["embedding"][te], data["labels"][te]), abs=1e-6)
  assert metrics["silhouette"] == pytest.approx(
      skm.silhouette_score(data["embedding"][te], data["labels"][te]), abs=1e-4)
  assert "Final" in proc.stdout and "stage 3/3" in proc.stdout
  # Only jaxembed's own lines: no TensorFlow start-up lines, whether it is installed or not.
  assert not [l for l in (proc.stdout + proc.stderr).splitlines() if any(f in l for f in FOREIGN)]


@pytest.mark.slow
def test_second_invocation_resumes_instead_of_retraining(smoke_run):
  workdir, first = smoke_run
  assert first.returncode == 0, first.stderr[-3000:]
  before = (workdir / "embeddings.npz").read_bytes()
  second = run_train("--config", "configs/digits.py:smoke", "--workdir", str(workdir))
  assert second.returncode == 0, second.stderr[-3000:]
  assert "already finished" in second.stdout
  assert "stage 1/3 | step" not in second.stdout
  assert (workdir / "embeddings.npz").read_bytes() == before


@pytest.mark.slow
def test_resume_with_other_config_is_refused(smoke_run):
  workdir, first = smoke_run
  assert first.returncode == 0
  config_before = (workdir / "config.json").read_text()
  proc = run_train("--config", "configs/digits.py:smoke", "--workdir", str(workdir),
                   "--config.seed=5")
  assert proc.returncode == 2
  assert "different configuration" in proc.stderr and "seed" in proc.stderr
  assert (workdir / "config.json").read_text() == config_before


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/nonexistent.py"], "nonexistent.py"),
    (["--config", "configs/digits.py:smoke", "--config.no_such_field=1"], "no_such_field"),
    (["--config", "configs/digits.py:smoke", "--config.batch_size=abc"], "batch_size"),
    (["--config", "configs/digits.py:nonsense"], "nonsense"),
    (["--config", "configs/digits.py:smoke", "--config.batch_size=1"], "batch_size must be"),
    (["--config", "configs/digits.py:smoke", "--config.model.name=resnet1000"], "resnet1000"),
    (["--config", "configs/digits.py:smoke", "--config.stages.epochs=(1,-1,1)"], "epochs"),
    (["--config", "configs/digits.py:smoke", "--config.optimizer.name=adagrad"], "adagrad"),
    (["--config", "configs/digits.py:smoke"], "--workdir"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
  if "--workdir" not in message:
    args = args + ["--workdir", str(tmp_path / "w")]
  proc = run_train(*args, timeout=120)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  err = proc.stderr.strip().splitlines()
  assert err and err[-1].startswith("error:") and message in err[-1], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


def test_workdir_that_is_a_file_is_refused(tmp_path):
  target = tmp_path / "afile"
  target.write_text("keep me")
  proc = run_train("--config", "configs/digits.py:smoke", "--workdir", str(target), timeout=120)
  assert proc.returncode == 2 and "is a file" in proc.stderr
  assert target.read_text() == "keep me"


def test_workdir_under_a_file_is_refused(tmp_path):
  target = tmp_path / "afile"
  target.write_text("keep me")
  proc = run_train("--config", "configs/digits.py:smoke", "--workdir", str(target / "sub"),
                   timeout=120)
  assert proc.returncode == 2 and "cannot create --workdir" in proc.stderr
  assert target.read_text() == "keep me"


@pytest.mark.slow
def test_tensorboard_events_read_back(smoke_run):
  workdir, first = smoke_run
  assert first.returncode == 0
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={"images": 0, "scalars": 0})
  acc.Reload()
  tags = acc.Tags()
  assert {"train/loss", "train/lr", "train/images_per_sec", "eval/knn_accuracy"} <= set(
      tags["scalars"])
  losses = acc.Scalars("train/loss")
  assert len(losses) >= 3 and all(np.isfinite(e.value) for e in losses)
  assert max(e.step for e in losses) == json.loads(
      (workdir / "metrics.json").read_text())["steps"]
  assert "embedding" in tags["images"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_mid_stage_then_resume_is_bit_identical(smoke_run, tmp_path):
  """A run killed with SIGKILL in stage 2 and restarted ends exactly like the uninterrupted one."""
  ref_dir, first = smoke_run
  assert first.returncode == 0
  workdir = tmp_path / "killed"
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, "-m", "jaxembed.train", "--config", "configs/digits.py:smoke",
         "--workdir", str(workdir)]
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if line.startswith("stage 2/3 | step 10/"):
      proc.kill()  # SIGKILL: no clean-up, possibly mid-checkpoint
      break
  proc.wait(timeout=60)
  assert proc.returncode == -9, "".join(seen)[-2000:]
  assert not (workdir / "metrics.json").exists()

  resumed = run_train(*cmd[3:])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resuming from the checkpoint at step" in resumed.stdout

  ref = np.load(ref_dir / "embeddings.npz")
  got = np.load(workdir / "embeddings.npz")
  for key in ("embedding", "head", "features"):
    np.testing.assert_array_equal(got[key], ref[key])
  assert json.loads((workdir / "metrics.json").read_text())["knn_accuracy"] == json.loads(
      (ref_dir / "metrics.json").read_text())["knn_accuracy"]
