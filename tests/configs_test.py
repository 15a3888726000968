"""Every shipped config file and variant builds and passes validation before any compute."""

import importlib

import pytest

from jaxembed import configlib

CASES = [
    ("digits", None), ("digits", "smoke"), ("digits", "paper"),
    ("fashion_mnist", None), ("fashion_mnist", "smoke"),
    ("cifar10", None), ("cifar10", "smoke"),
    ("medmnist", "breastmnist"), ("medmnist", "breastmnist,smoke"),
    ("medmnist", "bloodmnist,cpu"), ("medmnist", "pathmnist,64"),
]


@pytest.mark.parametrize("name,arg", CASES)
def test_config_validates(name, arg):
  config = importlib.import_module(f"jaxembed.configs.{name}").get_config(arg)
  stages = configlib.validate(config, num_devices=1)
  assert len(stages) == 3
  assert [s["head_dim"] for s in stages][-1] == 2


def test_medmnist_cpu_takes_the_default_jobs_model_and_schedule():
  digits = importlib.import_module("jaxembed.configs.digits").get_config()
  cpu = importlib.import_module("jaxembed.configs.medmnist").get_config("breastmnist,cpu")
  assert cpu.model.name == digits.model.name
  assert tuple(cpu.stages.epochs) == tuple(digits.stages.epochs)
  assert cpu.optimizer.name == digits.optimizer.name
  # ... but keeps the medical recipe's data and augmentation.
  assert cpu.aug.preset == "medical" and cpu.data.image_size == 28


def test_medmnist_needs_a_known_dataset_first():
  medmnist = importlib.import_module("jaxembed.configs.medmnist")
  with pytest.raises(ValueError, match="needs a dataset name first"):
    medmnist.get_config("smoke")
  with pytest.raises(ValueError, match="unknown config variant 'fast'"):
    medmnist.get_config("breastmnist,fast")
