"""Config resolution: switching the backbone, None for tuple fields, stages in steps."""

import json
import os

from absl import flags
from ml_collections import config_flags
import pytest

from jaxembed import configlib
from jaxembed import models
from jaxembed import schedule
from jaxembed import workdir as workdir_lib
from jaxembed.configs import common, digits, images

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(*overrides, config="digits.py"):
  """The config the command line makes of ``--config configs/<config> <overrides>``."""
  fv = flags.FlagValues()
  argv = ["prog", f"--config={os.path.join(REPO, 'configs', config)}", *overrides]
  # The override flags (--config.x.y) are defined from the command line it is given.
  config_flags.DEFINE_config_file("config", flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config.copy_and_resolve_references()


def test_command_line_none_for_a_tuple_field_is_read_as_none():
  config = parse("--config.model.stage_sizes=None")
  assert tuple(config.model.stage_sizes) == (None,)  # ml_collections' reading
  assert configlib.none_placeholders(config) == ["model.stage_sizes"]
  assert config.model.stage_sizes is None
  assert tuple(config.model.widths) == (16, 32, 64)  # other tuples are left alone


def test_switching_to_efficientnet_resets_the_resnet_options(capsys):
  config = parse("--config.model.name=efficientnet_b0")
  configlib.validate(config, num_devices=1)
  assert config.model.stage_sizes is None and config.model.widths is None
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 1
  assert out[0].startswith("model.name=efficientnet_b0: reset model.stage_sizes (1, 1, 1) and "
                           "model.widths (16, 32, 64)")
  own = models.own_options("efficientnet_b0")
  assert str(own["stage_sizes"]) in out[0] and str(own["widths"]) in out[0]
  # The model that validate lets through is EfficientNet-B0 as published (torchvision's
  # 4,007,548 backbone parameters are checked in models_test; here its stages).
  backbone = models.create_backbone("efficientnet_b0", **models.backbone_kwargs(config.model))
  assert tuple(s.num_blocks for s in backbone.stages) == (1, 2, 2, 3, 3, 4, 1)


def test_the_smoke_variant_switched_to_efficientnet_validates():
  config = digits.get_config("smoke")
  config.model.name = "efficientnet_b3"
  configlib.validate(config, num_devices=1)
  assert config.model.stage_sizes is None and config.model.widths is None


def test_options_that_fit_the_new_backbone_are_kept_with_a_line(capsys):
  config = parse("--config.model.name=resnet18")
  configlib.validate(config, num_devices=1)
  assert tuple(config.model.stage_sizes) == (1, 1, 1)
  out = capsys.readouterr().out
  assert "not resnet18 as published ((2, 2, 2, 2)" in out
  assert "--config.model.stage_sizes=None --config.model.widths=None builds it" in out
  # ... and that override gives resnet18 with no line.
  config = parse("--config.model.name=resnet18", "--config.model.stage_sizes=None",
                 "--config.model.widths=None")
  configlib.validate(config, num_devices=1)
  assert config.model.stage_sizes is None and config.model.widths is None
  assert "resnet18" not in capsys.readouterr().out


def test_an_efficientnet_with_its_own_number_of_stages_keeps_them(capsys):
  config = common.get_config()
  config.model.name = "efficientnet_b0"
  config.model.stage_sizes = (1, 1, 1, 1, 1, 1, 1)
  configlib.validate(config, num_devices=1)
  assert tuple(config.model.stage_sizes) == (1, 1, 1, 1, 1, 1, 1)
  assert "reset" not in capsys.readouterr().out


@pytest.mark.parametrize("overrides, message", [
    (("--config.model.stage_sizes=(2,2,2,2)",),
     "or --config.model.stage_sizes=None --config.model.widths=None for resnet_tiny's own"),
    (("--config.model.name=resnet18", "--config.model.widths=None"),
     "model.stage_sizes (1, 1, 1) has 3 stages but resnet18's own widths (64, 128, 256, 512) "
     "has 4; set --config.model.widths=<3 numbers> or --config.model.stage_sizes=None"),
])
def test_stage_counts_that_cannot_agree_name_the_override(overrides, message):
  config = parse(*overrides)
  with pytest.raises(configlib.ConfigError) as e:
    configlib.validate(config, num_devices=1)
  assert message in str(e.value)


def test_a_backbone_that_never_trains_needs_pretrained_weights():
  config = images.get_config("frozen,smoke")
  with pytest.raises(configlib.ConfigError, match="model.pretrained is not set"):
    configlib.validate(config, num_devices=1)
  config.model.pretrained = "weights.safetensors"
  assert [s["trainable"] for s in configlib.validate(config, num_devices=1)] == [
      "projector", "head_out", "projector"]


# ---------------------------------------------------------------------- stages in steps


@pytest.mark.parametrize("changes, message", [
    ({"steps": (10, 5)}, "stages.steps must be None or 3 non-negative integers"),
    ({"steps": (10, -1, 5)}, "stages.steps must be None or 3"),
    ({"steps": (0, 0, 0)}, "stages.steps are all 0"),
    ({"warmup_steps": (1, 0, 1)}, "stages.warmup_steps needs stages.steps"),
    ({"steps": (10, 5, 10), "warmup_steps": (11, 0, 0)}, "stage 1: warmup_steps=11"),
])
def test_steps_fields_are_checked(changes, message):
  config = digits.get_config()
  for key, value in changes.items():
    config.stages[key] = value
  with pytest.raises(configlib.ConfigError, match=message):
    configlib.stages(config)


def test_stages_in_steps_ignore_the_data_size():
  config = digits.get_config()
  config.stages.steps = (40, 10, 70)
  config.stages.warmup_steps = (5, 0, 7)
  for spe in (3, 11, 1000):
    stages = schedule.build_stages(configlib.stages(config), steps_per_epoch=spe)
    assert [s.num_steps for s in stages] == [40, 10, 70]
    assert [s.first_step for s in stages] == [0, 40, 50]
    assert [s.epochs for s in stages] == [-(-n // spe) for n in (40, 10, 70)]
    assert all(s.in_steps for s in stages)


def test_learning_rate_warms_up_in_steps():
  config = digits.get_config()
  config.stages.steps = (40, 10, 70)
  config.stages.warmup_steps = (5, 0, 7)
  stages = schedule.build_stages(configlib.stages(config), steps_per_epoch=11)
  peak = config.optimizer.base_lr * config.batch_size / 256
  lr = schedule.learning_rate(config, stages[0], 11)
  assert float(lr(0)) == 0.0
  assert float(lr(5)) == pytest.approx(peak)          # the end of the 5-step warm-up
  assert float(lr(2)) == pytest.approx(peak * 2 / 5)
  assert float(lr(39)) < peak * 0.01                   # cosine to 0 over the stage's 40 steps
  # Without warmup_steps, warmup_epochs (in epochs of the data) applies, within the stage.
  config.stages.warmup_steps = None
  stages = schedule.build_stages(configlib.stages(config), steps_per_epoch=11)
  assert float(schedule.learning_rate(config, stages[0], 11)(22)) == pytest.approx(peak)


def test_epoch_schedules_are_unchanged():
  config = digits.get_config()
  stages = schedule.build_stages(configlib.stages(config), steps_per_epoch=11)
  assert [s.num_steps for s in stages] == [330, 330, 4400]
  assert not any(s.in_steps for s in stages)
  lr = schedule.learning_rate(config, stages[0], 11)
  assert float(lr(22)) == pytest.approx(config.optimizer.base_lr * config.batch_size / 256)


def test_config_json_round_trip_keeps_the_steps(tmp_path):
  config = images.get_config("cpu")
  again = configlib.from_json(configlib.to_json(config))
  assert tuple(again.stages.steps) == tuple(config.stages.steps)
  assert configlib.stages(again) == configlib.stages(config)
  # A resumed run is checked against the config.json its first invocation wrote.
  record = {"data_hash": "x"}
  workdir_lib.check_or_write_config(str(tmp_path), config, record)
  workdir_lib.check_or_write_config(str(tmp_path), again, record, write=False)
  changed = config.copy_and_resolve_references()
  changed.stages.steps = (1, 1, 1)
  with pytest.raises(workdir_lib.WorkdirError, match="stages.steps"):
    workdir_lib.check_or_write_config(str(tmp_path), changed, record, write=False)


def test_config_json_without_the_steps_fields_still_resumes(tmp_path):
  config = digits.get_config()
  record = {"data_hash": "x"}
  workdir_lib.check_or_write_config(str(tmp_path), config, record)
  path = tmp_path / "config.json"
  old = json.loads(path.read_text())
  del old["stages"]["steps"], old["stages"]["warmup_steps"]  # as written before the fields
  path.write_text(json.dumps(old))
  workdir_lib.check_or_write_config(str(tmp_path), config, record, write=False)
  loaded = configlib.from_json(path.read_text())
  assert [s["steps"] for s in configlib.stages(loaded)] == [None, None, None]
