"""Checkpoints of a small state: damage is found or harmless, failed saves are one line, clean-up.

Every file of a saved checkpoint is truncated, deleted or has one byte changed in turn; a
restore must then give the saved values or report the checkpoint, never other values. (Orbax
0.12.8 alone restores a changed byte of an array's data without a word: the fingerprint of
jaxembed.checkpoint is what catches it.)
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from jaxembed import checkpoint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from full_disk import full_disk_at  # noqa: E402  pylint: disable=wrong-import-position


def state(seed):
  """A small train-state-like pytree: one array large enough for the data file, one inline."""
  rng = np.random.default_rng(seed)
  return {"params": {"w": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32),
                     "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
          "step": jnp.asarray(seed, jnp.int32)}


def equal(a, b):
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a),
                                                                   jax.tree.leaves(b)))


def new_manager(directory, keep=2):
  return checkpoint.create_manager(str(directory), keep=keep, stage_end_steps=[])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A folder with checkpoints 10 and 20 of state(10), state(20)."""
  directory = tmp_path_factory.mktemp("saved") / "checkpoints"
  with checkpoint.closing(new_manager(directory)) as manager:
    for step in (10, 20):
      checkpoint.save(manager, step, state(step))
  return directory


def copy(saved, tmp_path):
  target = tmp_path / "checkpoints"
  shutil.copytree(saved, target)
  return target


def files_of(directory):
  return sorted(os.path.relpath(os.path.join(root, f), directory)
                for root, _, names in os.walk(directory) for f in names)


def damage(path, how):
  size = os.path.getsize(path)
  if how == "truncate":
    with open(path, "r+b") as f:
      f.truncate(size // 2)
  elif how == "delete":
    os.remove(path)
  else:  # one bit of the middle byte
    with open(path, "r+b") as f:
      f.seek(size // 2)
      byte = f.read(1)
      f.seek(size // 2)
      f.write(bytes([byte[0] ^ 1]))


def test_fingerprint_is_stored_with_the_checkpoint(saved):
  """Orbax keeps our custom metadata in the step's metadata file (a renamed field would turn
  the check off silently)."""
  with open(saved / "20" / checkpoint.STEP_METADATA) as f:
    ours = json.load(f)["custom_metadata"]["jaxembed"]
  assert ours["fingerprint"] == checkpoint.fingerprint(state(20))
  assert set(ours["fingerprint"]) == {"['params']['b']", "['params']['w']", "['step']"}


def test_fingerprint_sees_any_single_change():
  a = state(1)
  for leaf, index in (("w", (63, 31)), ("w", (0, 0)), ("b", (2,))):
    b = jax.tree.map(lambda x: x, a)
    b["params"][leaf] = a["params"][leaf].at[index].set(np.nextafter(
        np.float32(a["params"][leaf][index]), np.float32(np.inf)))
    assert checkpoint.fingerprint(b) != checkpoint.fingerprint(a), (leaf, index)
  # The same values on 8 devices (other shardings) have the same fingerprint.
  replicated = jax.device_put(a, jax.sharding.NamedSharding(
      jax.make_mesh((8,), ("data",)), jax.sharding.PartitionSpec()))
  assert checkpoint.fingerprint(replicated) == checkpoint.fingerprint(jax.device_get(a))


# A failed restore leaves Orbax read coroutines and TensorStore callbacks that Python reports
# as unraisable whenever the garbage collector gets to them, possibly after the test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("how", ["truncate", "delete", "flip"])
def test_a_damaged_file_never_restores_other_values(saved, tmp_path, how):
  fallbacks = 0
  for rel in files_of(saved / "20"):
    work = tmp_path / rel.replace(os.sep, "_")
    directory = copy(saved, work)
    damage(directory / "20" / rel, how)
    warnings = []
    with checkpoint.closing(new_manager(directory)) as manager:
      step, got = checkpoint.restore_newest_intact(manager, state, warnings.append)
      assert equal(got, state(step)), (rel, how, step)
      if step == 10:  # reported, set aside, no longer listed
        fallbacks += 1
        assert len(warnings) == 1, warnings
        assert f"{directory}/20" in warnings[0] and "cannot be read" in warnings[0], warnings
        assert "using step 10, the newest intact one" in warnings[0]
        assert "\n" not in warnings[0] and len(warnings[0]) < 600, warnings[0]
        assert manager.all_steps() == [10]
        assert (directory / "damaged" / "20").is_dir()
      else:
        assert not warnings and step == 20
  # The array data and its metadata matter: some damage must have been caught.
  assert fallbacks >= 2


def test_set_aside_is_neither_restored_nor_counted_nor_deleted(saved, tmp_path):
  directory = copy(saved, tmp_path)
  with checkpoint.closing(new_manager(directory, keep=1)) as manager:
    assert checkpoint.set_aside(manager, 20) == f"{directory}/damaged/20"
    assert manager.all_steps() == [10]
    for step in (30, 40):
      checkpoint.save(manager, step, state(step))
  assert sorted(os.listdir(directory)) == ["40", "damaged"]
  assert os.listdir(directory / "damaged") == ["20"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_none_intact_says_so_and_moves_nothing(saved, tmp_path):
  directory = copy(saved, tmp_path)
  for step in (10, 20):
    with open(directory / str(step) / "default" / "_METADATA", "r+b") as f:
      f.truncate(40)
  with checkpoint.closing(new_manager(directory)) as manager:
    with pytest.raises(checkpoint.NoIntactCheckpoint) as e:
      checkpoint.restore_newest_intact(manager, state, print, if_none="start over")
  message = str(e.value)
  assert message.startswith(f"none of the 2 checkpoints in {directory} can be read (steps 10, "
                            "20; the newest: JSONDecodeError: ")
  assert message.endswith("; start over") and "\n" not in message
  assert sorted(os.listdir(directory)) == ["10", "20"]


def test_an_explicit_damaged_step_is_an_error(saved, tmp_path):
  directory = copy(saved, tmp_path)
  damage(directory / "10" / "_CHECKPOINT_METADATA", "truncate")
  with checkpoint.closing(new_manager(directory)) as manager:
    with pytest.raises(checkpoint.DamagedCheckpoint, match=r"the checkpoint at step 10 \(.*/10\)"
                       r" cannot be read \(_CHECKPOINT_METADATA: JSONDecodeError: "):
      checkpoint.restore(manager, 10, state(0))
    assert equal(checkpoint.restore(manager, 20, state(0)), state(20))


def test_a_failed_save_is_one_line_and_keeps_the_earlier_ones(saved, tmp_path, monkeypatch):
  directory = copy(saved, tmp_path)
  monkeypatch.setattr(ts, "open", full_disk_at(30))
  manager = new_manager(directory, keep=1)
  checkpoint.save(manager, 30, state(30))  # the failure happens in Orbax's background thread
  with pytest.raises(checkpoint.SaveError) as e:
    checkpoint.close(manager)
  assert str(e.value) == (
      f"cannot save the checkpoint in {directory}/30: No space left on device (errno ENOSPC); "
      "the checkpoints before it are intact (newest: step 20). Free space or fix the "
      "permissions, then run the same command to resume")
  assert sorted(os.listdir(directory)) == ["10", "20", "30" + checkpoint.UNFINISHED]

  # Space freed: the next run removes the leftover and restores the newest intact one.
  monkeypatch.undo()
  assert checkpoint.remove_unfinished(str(directory)) == [
      f"{directory}/30{checkpoint.UNFINISHED}"]
  with checkpoint.closing(new_manager(directory, keep=1)) as manager:
    step, got = checkpoint.restore_newest_intact(manager, state, print)
    assert step == 20 and equal(got, state(20))
    checkpoint.save(manager, 30, state(30))
  assert sorted(os.listdir(directory)) == ["30"]  # keep=1


def test_a_failed_save_surfaces_at_the_next_save_or_poll(saved, tmp_path, monkeypatch):
  directory = copy(saved, tmp_path)
  monkeypatch.setattr(ts, "open", full_disk_at(30))
  manager = new_manager(directory)
  checkpoint.save(manager, 30, state(30))
  with pytest.raises(checkpoint.SaveError, match=f"in {directory}/30: No space left"):
    checkpoint.save(manager, 40, state(40))
  checkpoint.close(manager)  # the error was reported once; closing is quiet


def test_describe_is_one_short_line():
  try:
    json.loads('{"a": "b')
  except ValueError as e:
    assert checkpoint.describe(e) == (
        "JSONDecodeError: Unterminated string starting at: line 1 column 7 (char 6)")
  inner = ValueError('FAILED_PRECONDITION: Error reading "x" [tensorstore_spec=\'' + "x" * 5000
                     + "']")
  outer = Exception("Encountered error while reading array index: (slice(0, 3, 1),). See full "
                    "TensorStore details: <" + "y" * 5000 + ">")
  outer.__cause__ = inner
  assert checkpoint.describe(outer) == 'FAILED_PRECONDITION: Error reading "x"'
  assert checkpoint.describe(OSError(28, "No space left on device", "/x/f")) == (
      "No space left on device (/x/f)")
  assert len(checkpoint.describe(ValueError("z" * 1000))) == 220


def test_a_real_full_disk(tmp_path):
  """A tmpfs of 256 KiB filled by saves: a SaveError, then after a remount resumes (root only)."""
  mount = tmp_path / "disk"
  mount.mkdir()
  if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs",
                                          str(mount)], capture_output=True).returncode:
    pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
  try:
    directory = mount / "checkpoints"
    manager = new_manager(directory, keep=100)
    saved_steps = []
    with pytest.raises(checkpoint.SaveError) as e:
      for step in range(1, 200):
        checkpoint.save(manager, step, state(step))
        checkpoint.wait(manager)
        saved_steps.append(step)
    checkpoint.close(manager)
    failed = saved_steps[-1] + 1 if saved_steps else 1
    assert f"cannot save the checkpoint in {directory}/{failed}: " in str(e.value)
    assert "No space left on device" in str(e.value) and "\n" not in str(e.value)
    subprocess.run(["mount", "-o", "remount,size=4m", str(mount)], check=True)
    checkpoint.remove_unfinished(str(directory))
    with checkpoint.closing(new_manager(directory, keep=100)) as manager:
      step, got = checkpoint.restore_newest_intact(manager, state, print)
      assert step == saved_steps[-1] and equal(got, state(step))
  finally:
    subprocess.run(["umount", str(mount)], check=False)
