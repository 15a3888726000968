"""Every shipped config file and variant builds and passes validation before any compute."""

import importlib
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from jaxembed import configlib
from jaxembed import models
from jaxembed import schedule
from jaxembed.configs import common, images

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [
    ("digits", None), ("digits", "smoke"), ("digits", "paper"),
    ("fashion_mnist", None), ("fashion_mnist", "smoke"),
    ("cifar10", None), ("cifar10", "smoke"),
    ("medmnist", "breastmnist"), ("medmnist", "breastmnist,smoke"),
    ("medmnist", "bloodmnist,cpu"), ("medmnist", "pathmnist,64"),
    ("fashion_mnist", "cpu"),
    ("images", None), ("images", "smoke"), ("images", "medical"), ("images", "cpu"),
    ("images", "224"), ("images", "efficientnet_b3,300"), ("images", "resnet50,medical,128"),
    ("images", "cpu,smoke"),
]


@pytest.mark.parametrize("name,arg", CASES)
def test_config_validates(name, arg):
  config = importlib.import_module(f"jaxembed.configs.{name}").get_config(arg)
  stages = configlib.validate(config, num_devices=1)
  assert len(stages) == 3
  assert [s["head_dim"] for s in stages][-1] == 2


def test_medmnist_cpu_takes_the_default_jobs_model_and_schedule_in_steps():
  digits = importlib.import_module("jaxembed.configs.digits").get_config()
  cpu = importlib.import_module("jaxembed.configs.medmnist").get_config("breastmnist,cpu")
  assert cpu.model.name == digits.model.name
  assert tuple(cpu.stages.lr_scale) == tuple(digits.stages.lr_scale)
  assert cpu.optimizer.name == digits.optimizer.name
  # ... in steps, the same for any number of images ...
  for spe in (5, 21, 400):
    stages = schedule.build_stages(configlib.stages(cpu), spe)
    assert tuple(s.num_steps for s in stages) == common.CPU_STEPS
  # ... and keeps the medical recipe's data and augmentation.
  assert cpu.aug.preset == "medical" and cpu.data.image_size == 28


def test_smoke_after_cpu_is_still_seconds():
  config = images.get_config("cpu,smoke")
  assert config.stages.steps is None and tuple(config.stages.epochs) == (1, 1, 1)


def test_images_variants():
  assert images.get_config().model.stem == "imagenet"
  assert images.get_config().data.channels == 3
  b3 = images.get_config("efficientnet_b3,300")
  assert (b3.model.name, b3.data.image_size) == ("efficientnet_b3", 300)
  assert images.get_config("medical").aug.preset == "medical"
  frozen = images.get_config("frozen")
  assert "all" not in frozen.stages.trainable
  assert tuple(frozen.model.input_mean) == images.IMAGENET_MEAN
  cpu = images.get_config("cpu")
  assert cpu.model.name == "resnet_tiny" and cpu.model.stem == "cifar"
  assert set(images.BACKBONES) == set(models.BACKBONES) - set(models.CONFIGURABLE)
  with pytest.raises(ValueError, match="unknown config variant 'b7'"):
    images.get_config("b7")


def test_shipped_configs_list_images_by_its_first_line():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-m", "jaxembed.main", "configs"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  line = next(ln for ln in proc.stdout.splitlines() if ln.split()[:1] == ["images"])
  assert "A folder of your own images" in line


def _write_mixed_folder(root):
  """Two class subfolders of JPEGs of mixed sizes, colour and gray."""
  rng = np.random.default_rng(0)
  for c, name in enumerate(("cats", "dogs")):
    os.makedirs(root / name)
    for i in range(12):
      h, w = int(rng.integers(12, 40)), int(rng.integers(12, 40))
      pixels = rng.integers(0, 120, (h, w, 3)) + 120 * c
      img = Image.fromarray(pixels.astype(np.uint8))
      (img.convert("L") if i % 3 == 0 else img).save(root / name / f"{i}.jpg")


@pytest.mark.slow
def test_images_smoke_trains_on_a_folder_of_mixed_jpegs(tmp_path):
  _write_mixed_folder(tmp_path / "photos")
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the machine's real devices, as a user runs it
  proc = subprocess.run(
      [sys.executable, "-m", "jaxembed.train", "--config", "images:smoke",
       f"--config.data.path={tmp_path / 'photos'}", f"--workdir={tmp_path / 'run'}",
       "--config.stages.steps=(6,2,6)", "--config.stages.warmup_steps=(2,0,2)"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "Stage plan: 3 stages, 14 steps" in proc.stdout
  assert "Expected duration: about" in proc.stdout
  metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
  assert metrics["steps"] == 14
  assert "knn_accuracy" in metrics   # labelled by the subfolders, scored on the held-out 20%
  config = json.loads((tmp_path / "run" / "config.json").read_text())
  assert config["stages"]["steps"] == [6, 2, 6] and config["data"]["channels"] == 3


def test_medmnist_needs_a_known_dataset_first():
  medmnist = importlib.import_module("jaxembed.configs.medmnist")
  with pytest.raises(ValueError, match="needs a dataset name first"):
    medmnist.get_config("smoke")
  with pytest.raises(ValueError, match="unknown config variant 'fast'"):
    medmnist.get_config("breastmnist,fast")
