"""Trainer pieces: config validation, stages, learning rates, freezing, fail-fast, determinism."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxembed.configs import common, digits
from jaxembed import configlib, parallel, schedule, train_state, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config(**changes):
  c = digits.get_config("smoke")
  for key, value in changes.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.mark.parametrize("changes, message", [
    ({"batch_size": 36}, "not divisible by the 8 devices"),
    ({"batch_size": 1}, "batch_size"),
    ({"stages.epochs": (1, -2, 1)}, "stage 2: epochs"),
    ({"stages.epochs": (0, 0, 0)}, "nothing to train"),
    ({"stages.epochs": (1, 1)}, "one entry per stage"),
    ({"stages.head_init": ("keep", "normal", "keep")}, "needs a previous stage"),
    ({"stages.head_init": ("lecun", "keep", "keep")}, "head_dim changes"),
    ({"stages.head_init": ("pca", "normal", "keep")}, "trained hidden layer"),
    ({"stages.trainable": ("all", "some", "all")}, "trainable 'some'"),
    ({"stages.warmup_epochs": (5, 0, 0)}, "warmup_epochs"),
    ({"stages.lr_scale": (1.0, 0.0, 1.0)}, "lr_scale"),
    ({"model.name": "vgg"}, "unknown model.name 'vgg'"),
    ({"model.dtype": "float16"}, "model.dtype"),
    ({"optimizer.name": "rmsprop"}, "rmsprop"),
    ({"optimizer.base_lr": -1.0}, "base_lr"),
    ({"loss.name": "triplet"}, "triplet"),
    ({"eval.protocol": "mine"}, "protocol"),
    ({"eval.every_epochs": -1}, "eval.every_epochs"),
    ({"aug.preset": "heavy"}, "config.aug"),
    ({"logging.writer": "wandb"}, "logging.writer"),
])
def test_validation_rejects_impossible_values(changes, message):
  with pytest.raises(configlib.ConfigError, match=message.replace("(", r"\(")):
    configlib.validate(smoke_config(**changes))


def test_every_shipped_config_validates():
  for arg in (None, "smoke", "paper"):
    assert len(configlib.validate(digits.get_config(arg))) == 3
  assert configlib.validate(common.get_config())[2]["lr_scale"] == 0.001


def test_stage_bookkeeping():
  c = digits.get_config()
  c.stages.epochs = (20, 30, 90)  # fixed here, whatever the default schedule is
  stages = schedule.build_stages(configlib.stages(c), steps_per_epoch=11)
  assert [s.first_step for s in stages] == [0, 220, 550]
  assert stages[-1].last_step == 1540
  assert schedule.stage_of_step(stages, 0).index == 0
  assert schedule.stage_of_step(stages, 220).index == 0   # a stage end belongs to its stage
  assert schedule.stage_of_step(stages, 221).index == 1
  assert schedule.stage_of_step(stages, 1540).index == 2


def test_learning_rate_warmup_then_cosine():
  c = common.get_config()
  c.batch_size = 512
  stage = schedule.build_stages(configlib.stages(c), steps_per_epoch=10)[0]
  sched = schedule.learning_rate(c, stage, 10)
  peak = 0.03 * 512 / 256          # reference: 0.03 * B / 256
  warm, total = 100, 10000         # 10 warm-up epochs of 10 steps, 1000 epochs
  for t in (0, 50, 100, 2000, 5000, 9999):
    want = peak * t / warm if t < warm else peak * 0.5 * (
        1 + np.cos(np.pi * (t - warm) / (total - warm)))
    assert float(sched(t)) == pytest.approx(want, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("trainable, trained", [
    ("head_out", {"out"}), ("projector", {"out", "hidden"}), ("all", {"out", "hidden", "bb"})])
def test_freezing_changes_only_trainable_parameters(trainable, trained):
  params = {"backbone": {"bb": jnp.ones(3)},
            "projector": {"hidden": jnp.ones(2), "out": jnp.ones(2)}}
  c = common.get_config()
  tx = schedule.make_optimizer(c.optimizer, 0.1, trainable, params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  moved = {k for k, v in {"bb": updates["backbone"]["bb"], "hidden": updates["projector"]["hidden"],
                           "out": updates["projector"]["out"]}.items() if np.any(v != 0)}
  assert moved == trained


def test_sgd_matches_pytorch_rule():
  """clip by value, then g + wd * p, then momentum (PyTorch SGD), then p - lr * v."""
  c = common.get_config()
  p = {"w": jnp.array([1.0, -2.0, 3.0])}
  g = {"w": jnp.array([10.0, 0.5, -0.1])}
  tx = schedule.make_optimizer(c.optimizer, 0.1, "all", p)
  state = tx.init(p)
  u1, state = tx.update(g, state, p)
  p1 = optax.apply_updates(p, u1)
  u2, _ = tx.update(g, state, p1)
  gp = lambda w: np.clip(np.array([10.0, 0.5, -0.1]), -4, 4) + 5e-4 * w
  v1 = gp(np.array([1.0, -2.0, 3.0]))
  w1 = np.array([1.0, -2.0, 3.0]) - 0.1 * v1
  v2 = 0.9 * v1 + gp(w1)
  np.testing.assert_allclose(np.asarray(p1["w"]), w1, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(optax.apply_updates(p1, u2)["w"]), w1 - 0.1 * v2,
                             rtol=1e-6)


def test_pca_head_starts_from_principal_directions():
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(500, 6)) * np.array([5.0, 2.0, 1.0, 0.5, 0.2, 0.1]) + 3.0
  out = train_state.new_head("pca", jax.random.key(0), hidden, 2, None, pca_std=10.0)
  z = hidden @ np.asarray(out["kernel"]) + np.asarray(out["bias"])
  np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-4)
  assert z[:, 0].std() == pytest.approx(10.0, rel=1e-4)
  # Same subspace as scikit-learn's PCA.
  from sklearn.decomposition import PCA
  ref = PCA(2).fit_transform(hidden)
  for j in range(2):
    assert abs(np.corrcoef(ref[:, j], z[:, j])[0, 1]) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.slow
def test_non_finite_loss_stops_with_step_stage_and_hint(tmp_path):
  c = smoke_config(**{"optimizer.base_lr": 1e30, "optimizer.clip_value": 0.0})
  with pytest.raises(trainer.TrainingError, match=r"non-finite .* step \d+ \(stage 1/3\).*lower"):
    trainer.train_and_evaluate(c, str(tmp_path / "w"))
  assert not (tmp_path / "w" / "metrics.json").exists()


@pytest.mark.slow
def test_periodic_evaluation_logs_metrics_and_the_map(tmp_path, capsys):
  """eval.every_epochs=1 evaluates inside the stages; 2-D stages add the map as an image."""
  c = smoke_config(**{"stages.epochs": (2, 0, 2), "eval.every_epochs": 1})
  trainer.train_and_evaluate(c, str(tmp_path / "w"))
  out = capsys.readouterr().out
  spe = json.loads((tmp_path / "w" / "config.json").read_text())["run"]["num_train"] // 32
  # One evaluation after the first epoch of stages 1 and 3 (their ends are stage evaluations).
  assert out.count("evaluation at step") == 2
  assert f"evaluation at step {spe}:" in out and f"evaluation at step {3 * spe}:" in out
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(tmp_path / "w"),
                                           size_guidance={"images": 0, "scalars": 0})
  acc.Reload()
  knn_steps = [e.step for e in acc.Scalars("eval/knn_accuracy")]
  assert spe in knn_steps and 3 * spe in knn_steps
  maps = acc.Images("eval/map")
  assert {e.step for e in maps} == {2 * spe, 3 * spe, 4 * spe}  # stage ends 2, 3 and the periodic
  assert all(e.width > 100 and e.height > 100 for e in maps)


# ------------------------------------------------------------------ determinism


def run_python(code, xla_flags=None):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=120)


def test_deterministic_flag_is_set_before_the_backend_starts_and_xla_knows_it():
  code = ("import os\n"
          "from jaxembed import parallel\n"
          "assert parallel.enable_deterministic_ops()\n"
          "import jax\n"
          "print(float(jax.numpy.arange(3.0).sum()))\n"
          "print('FLAGS', os.environ['XLA_FLAGS'])\n")
  proc = run_python(code, "--xla_force_host_platform_device_count=2")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "3.0" in proc.stdout
  flags = proc.stdout.split("FLAGS", 1)[1].split()
  assert flags == ["--xla_force_host_platform_device_count=2", "--xla_gpu_deterministic_ops=true"]
  # XLA rejects flags it does not know when the backend starts, so the run above shows
  # that this jaxlib knows the flag's name; a misspelt one fails the same program.
  bad = run_python("import jax; print(jax.numpy.zeros(1))", "--xla_gpu_determinstic_ops=true")
  assert bad.returncode != 0 and "Unknown flag" in bad.stderr


def test_deterministic_after_the_backend_started(monkeypatch):
  jax.devices()  # this process's CPU backend is running
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  assert parallel.enable_deterministic_ops() is False    # CPU: a warning, results repeat anyway
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"

  class FakeGpu:
    platform = "gpu"
  monkeypatch.setattr(jax, "devices", lambda *a: [FakeGpu()])
  with pytest.raises(ValueError, match="before JAX starts its GPU backend"):
    parallel.enable_deterministic_ops()
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=true")
  assert parallel.enable_deterministic_ops() is True    # set by the user in the environment


@pytest.mark.slow
def test_deterministic_cli_run(tmp_path):
  one_stage = ["--config.stages.epochs=(1,)", "--config.stages.lr_scale=(1.0,)",
               "--config.stages.warmup_epochs=(0,)", "--config.stages.head_dim=(2,)",
               "--config.stages.head_init=('lecun',)", "--config.stages.trainable=('all',)"]
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-m", "jaxembed.train", "--config", "configs/digits.py:smoke",
       "--workdir", str(tmp_path / "w"), "--config.train.deterministic=True",
       "--config.outputs.plots=False", "--config.data.max_examples=128", *one_stage],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Deterministic XLA ops: XLA_FLAGS='--xla_gpu_deterministic_ops=true'" in proc.stdout
  metrics = json.loads((tmp_path / "w" / "metrics.json").read_text())
  assert metrics["steps"] == 3 and np.isfinite(metrics["knn_accuracy"])
  config = json.loads((tmp_path / "w" / "config.json").read_text())
  assert config["train"]["deterministic"] is True
