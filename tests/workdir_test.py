"""Resuming a workdir: which config changes are refused and which are allowed."""

import json
import os

import pytest

from jaxembed.configs import common
from jaxembed import workdir

RUN = {"data_hash": "abc"}


def _write(tmp_path, config):
  workdir.check_or_write_config(str(tmp_path), config, RUN)
  return os.path.join(str(tmp_path), workdir.CONFIG)


def test_same_config_resumes(tmp_path):
  config = common.get_config()
  path = _write(tmp_path, config)
  with open(path) as f:
    written = f.read()
  assert json.loads(written)["run"] == RUN and json.loads(written)["seed"] == config.seed
  assert workdir.check_or_write_config(str(tmp_path), config, RUN) is None  # no error
  with open(path) as f:
    assert f.read() == written  # the original record is kept, not rewritten


@pytest.mark.parametrize("field,value", [("seed", 1), ("batch_size", 256),
                                         ("optimizer.base_lr", 0.1)])
def test_a_changed_training_field_is_refused(tmp_path, field, value):
  config = common.get_config()
  _write(tmp_path, config)
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(workdir.WorkdirError, match=f"different configuration.*{field}"):
    workdir.check_or_write_config(str(tmp_path), config, RUN)


def test_other_data_is_refused(tmp_path):
  config = common.get_config()
  _write(tmp_path, config)
  with pytest.raises(workdir.WorkdirError, match="data hash"):
    workdir.check_or_write_config(str(tmp_path), config, {"data_hash": "other"})


def test_logging_checkpointing_and_chunking_may_change(tmp_path):
  config = common.get_config()
  path = _write(tmp_path, config)
  config.logging.every_steps = 7
  config.checkpoint.every_steps = 3
  config.outputs.plots = False
  config.train.chunk_size = 64
  with open(path) as f:
    written = f.read()
  assert workdir.check_or_write_config(str(tmp_path), config, RUN) is None  # no error
  with open(path) as f:
    assert json.loads(f.read()) == json.loads(written)  # the original config stays


def test_a_config_json_from_before_a_field_existed(tmp_path):
  config = common.get_config()
  path = _write(tmp_path, config)
  with open(path) as f:
    old = json.load(f)
  del old["train"]["deterministic"]  # written by a version without the field
  with open(path, "w") as f:
    json.dump(old, f)
  workdir.check_or_write_config(str(tmp_path), config, RUN)  # the default: same run
  config.train.deterministic = True
  with pytest.raises(workdir.WorkdirError, match="train.deterministic"):
    workdir.check_or_write_config(str(tmp_path), config, RUN)
