"""Orbax checkpoints of the training state: saved with a fingerprint, restored only when intact.

Orbax writes each checkpoint into ``<step>.orbax-checkpoint-tmp`` and renames it when complete,
so a killed process leaves whole checkpoints and at most one unfinished folder, which
:func:`remove_unfinished` clears before the next run saves. A whole checkpoint can still be
damaged afterwards (a torn write, a bad disk). Restoring it then fails with one of many
exception types (json, TensorStore, pytree errors), or, for a changed byte in an array's data,
returns other values without a word: Orbax 0.12.8 keeps no checksum of the data. So
:func:`save` stores a fingerprint of the state in the step's own metadata, :func:`restore`
compares it, and :func:`restore_newest_intact` falls back to the newest checkpoint that
restores intact, moving damaged ones to ``damaged/`` (kept, but no longer listed by Orbax, so
never restored, counted among the kept ones or deleted). Failures become one-line errors:
:class:`SaveError`, :class:`DamagedCheckpoint`, :class:`NoIntactCheckpoint`.
"""

import contextlib
import errno
import gc
import json
import logging
import os
import re
import shutil
import sys

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

_policy = checkpoint_managers.preservation_policy

DAMAGED = "damaged"                  # <checkpoints>/damaged/<step>: set aside, kept
UNFINISHED = ".orbax-checkpoint-tmp"  # in the name of an unfinished save's folder
STEP_METADATA = "_CHECKPOINT_METADATA"  # Orbax's per-step file; holds our custom metadata
OURS = "jaxembed"


class CheckpointError(ValueError):
  """A checkpoint problem the user has to act on; the message is one line."""


class SaveError(CheckpointError):
  """A save failed (disk full, permission lost); the checkpoints before it are intact."""


class DamagedCheckpoint(CheckpointError):
  """Checkpoint ``step`` at ``path`` cannot be read; ``reason`` says why in one line."""

  def __init__(self, step, path, reason):
    super().__init__(f"the checkpoint at step {step} ({path}) cannot be read ({reason})")
    self.step, self.path, self.reason = step, path, reason


class NoIntactCheckpoint(CheckpointError):
  """Checkpoints exist, but none of them can be read."""


# ------------------------------------------------------------------------ managers


def remove_unfinished(directory):
  """Removes the folders of unfinished saves in ``directory``; returns their paths.

  Call it before :func:`create_manager`. (Orbax's own clean-up runs in a background thread
  that, when the run fails early, meets interpreter shutdown and prints "cannot schedule new
  futures after interpreter shutdown" tracebacks.) The first process removes, the others wait.
  """
  removed = []
  if jax.process_index() == 0 and os.path.isdir(directory):
    for name in sorted(os.listdir(directory)):
      if UNFINISHED in name:
        path = os.path.join(directory, name)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
  _sync("jaxembed_remove_unfinished")
  return removed


def create_manager(directory, keep, stage_end_steps, async_save=True):
  """A CheckpointManager keeping the newest ``keep`` checkpoints plus every stage end."""
  policy = _policy.AnyPreservationPolicy([
      _policy.LatestN(n=max(1, keep)),
      _policy.CustomSteps(steps=list(stage_end_steps)),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=False,  # remove_unfinished does it, in the foreground
      create=True,
  )
  return ocp.CheckpointManager(directory, options=options)


def open_manager(directory):
  """A read-only manager over an existing checkpoint folder (export, search)."""
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))


@contextlib.contextmanager
def closing(manager):
  """Closes ``manager`` on leaving the block, after its save in flight has finished.

  A save that failed raises SaveError here, unless the block is already raising: then that
  exception goes on. Orbax's threads are done before the process unwinds (a save still in
  flight at exit is lost, with tracebacks).
  """
  try:
    yield manager
  except BaseException:
    with contextlib.suppress(Exception):
      close(manager)
    raise
  close(manager)


# --------------------------------------------------------------------- fingerprint


def _leaf_checksum(x):
  """The uint32 sum of the elements' bit patterns times odd weights, modulo 2**32.

  Integer sums wrap exactly, so the value depends on nothing but the bits; an odd weight is
  invertible modulo 2**32, so a change of any single element always changes the sum. Computed
  with NumPy on the host: as a jitted function XLA took 4-15 s to compile it for a ResNet-18
  state on two CPU cores (the run: 0.1 s), time a stop inside a grace period cannot spare;
  NumPy takes 0.04 s for its 22.4 M floats, the copy to the host included (issue #22).
  """
  x = np.ascontiguousarray(x).reshape(-1)
  bits = x.view({1: np.uint8, 2: np.uint16}.get(x.dtype.itemsize, np.uint32)).astype(np.uint32)
  weights = np.arange(bits.size, dtype=np.uint32) * np.uint32(2654435761) | np.uint32(1)
  return int(np.sum(bits * weights, dtype=np.uint32))


def _on_host(x):
  """A leaf of the state as a NumPy array (state arrays are replicated over every device)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def fingerprint(state):
  """``{leaf path: 8 hex digits}`` of a pytree of arrays; the same for any devices or sharding."""
  return {jax.tree_util.keystr(path): f"{_leaf_checksum(_on_host(leaf)):08x}"
          for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


# ---------------------------------------------------------------------------- save


def save(manager, step, state):
  """Starts saving ``state`` as checkpoint ``step``, with its fingerprint in the step metadata.

  Raises SaveError if this save cannot start or the previous (background) one failed.
  """
  meta = {OURS: {"format": 1, "fingerprint": fingerprint(state)}}
  try:
    manager.save(step, args=ocp.args.StandardSave(state), force=True, custom_metadata=meta)
  except Exception as e:  # pylint: disable=broad-except  # the previous save's failure, or this
    raise SaveError(_save_message(manager, e, step)) from None


def poll(manager):
  """Raises SaveError if a background save has failed; never waits (call it often)."""
  if not manager.is_saving_in_progress():
    wait(manager)


def wait(manager):
  """Waits for the save in flight; SaveError if it failed."""
  try:
    manager.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    raise SaveError(_save_message(manager, e)) from None


def close(manager):
  """Waits for the save in flight and closes ``manager``; SaveError (once closed) if it failed."""
  try:
    wait(manager)
  finally:
    with contextlib.suppress(Exception):
      manager.close()


def _finished_steps(directory):
  """The complete checkpoints in ``directory``, read from the disk (not a manager's cache)."""
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(n) for n in names
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def _save_message(manager, e, step=None):
  """The one line of a failed save: the checkpoint's path, the cause, what is intact, the fix."""
  directory = str(manager.directory)
  # A failed background save leaves its unfinished folder: that names the step.
  names = os.listdir(directory) if os.path.isdir(directory) else []
  unfinished = sorted(int(n.split(".")[0]) for n in names
                      if UNFINISHED in n and n.split(".")[0].isdigit())
  failed = unfinished[-1] if unfinished else step
  where = os.path.join(directory, str(failed)) if failed is not None else directory
  kept = [s for s in _finished_steps(directory) if s != failed]
  intact = (f"the checkpoints before it are intact (newest: step {kept[-1]})" if kept
            else "there is no earlier checkpoint")
  return (f"cannot save the checkpoint in {where}: {describe(e)}; {intact}. Free space or fix "
          "the permissions, then run the same command to resume")


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def describe(e, limit=220):
  """One line for an exception from Orbax, TensorStore, json or the OS, without spec dumps."""
  while e.__cause__ is not None:  # Orbax wraps TensorStore's error: the innermost says why
    e = e.__cause__
  if isinstance(e, OSError) and e.errno:
    return f"{e.strerror} ({e.filename})" if e.filename else str(e.strerror)
  text = str(e)
  code = _OS_ERROR_CODE.search(text)
  if code:
    code = int(code.group(1))
    return f"{os.strerror(code)} (errno {errno.errorcode.get(code, code)})"
  text = text.split(" [tensorstore_spec=")[0].split("See full TensorStore details")[0]
  text = re.sub(r' in OCDBT database at local file "[^"]*"', "", text)  # the path is named
  text = re.sub(r'Error opening "(cast|zarr)" driver: ', "", text)
  line = " ".join(text.split())
  if type(e).__name__ not in ("ValueError", "Exception"):
    line = f"{type(e).__name__}: {line}"
  return line if len(line) <= limit else line[:limit - 3] + "..."


# ------------------------------------------------------------------------- restore


def abstract_like(state):
  """ShapeDtypeStructs with the shardings of ``state``: a restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      state)


def _our_metadata(path):
  """Our part of the step metadata: {} for a checkpoint saved before fingerprints existed.

  Orbax itself only logs an unreadable step metadata file and restores anyway; it is written
  last, at the commit, so an unreadable one means a torn checkpoint.
  """
  try:
    with open(os.path.join(path, STEP_METADATA), "rb") as f:
      meta = json.load(f)
  except FileNotFoundError:
    return {}
  except (OSError, ValueError) as e:
    raise DamagedCheckpoint(os.path.basename(path), path, f"{STEP_METADATA}: {describe(e)}") \
        from None
  custom = meta.get("custom_metadata") if isinstance(meta, dict) else None
  return (custom or {}).get(OURS, {})


def restore(manager, step, target_state):
  """Checkpoint ``step`` in the structure, dtypes and shardings of ``target_state``.

  Raises DamagedCheckpoint if it cannot be read or differs from the fingerprint it was saved
  with.
  """
  path = os.path.join(str(manager.directory), str(step))
  want = _our_metadata(path).get("fingerprint")
  try:
    with quiet_orbax():
      state = manager.restore(step, args=ocp.args.StandardRestore(abstract_like(target_state)))
  except Exception as e:  # pylint: disable=broad-except  # json, TensorStore, pytree, Exception()
    raise DamagedCheckpoint(step, path, describe(e)) from None
  if want:
    got = fingerprint(state)
    differ = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if differ:
      raise DamagedCheckpoint(step, path, f"{len(differ)} arrays differ from the fingerprint "
                              f"saved with them, e.g. {differ[0]}")
  return state


def set_aside(manager, step):
  """Moves checkpoint ``step`` to ``damaged/<step>`` (``<step>.2``, ... if taken); its new path."""
  directory = str(manager.directory)
  target = os.path.join(directory, DAMAGED, str(step))
  n = 1
  while os.path.exists(target):
    n += 1
    target = os.path.join(directory, DAMAGED, f"{step}.{n}")
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.rename(os.path.join(directory, str(step)), target)
  _sync(f"jaxembed_set_aside_{step}")
  manager.reload()
  return target


def restore_newest_intact(manager, target_for_step, warn, move_aside=True,
                          if_none="to start over, use a new --workdir"):
  """``(step, state)`` of the newest checkpoint that restores intact; (None, None) without any.

  Args:
    manager: the run's CheckpointManager.
    target_for_step: ``step -> state`` to restore into (a stage's own structure).
    warn: called with one line for each damaged checkpoint skipped.
    move_aside: set the damaged ones aside (training); False leaves them (export, search).
    if_none: the advice ending the error when checkpoints exist but none is intact.

  Raises:
    NoIntactCheckpoint: checkpoints exist, but none is intact. Nothing is moved then, so the
      next attempt says the same instead of silently starting over.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  damaged = []
  for step in steps:
    try:
      state = restore(manager, step, target_for_step(step))
    except DamagedCheckpoint as d:
      damaged.append(d)
      continue
    for d in damaged:
      moved = f"moved it to {set_aside(manager, d.step)}; " if move_aside else ""
      warn(f"warning: {d}; {moved}using step {step}, the newest intact one")
    return step, state
  if not steps:
    return None, None
  raise NoIntactCheckpoint(
      f"none of the {len(steps)} checkpoints in {manager.directory} can be read (steps "
      f"{', '.join(str(d.step) for d in reversed(damaged))}; the newest: {damaged[0].reason}); "
      f"{if_none}")


def _sync(name):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------- logging


class _OrbaxErrors(logging.Filter):
  """Drops Orbax's error records (tracebacks with kilobytes of TensorStore specs) and asyncio's.

  jaxembed reports the failures behind them (a save, a damaged checkpoint) in one line.
  """

  def filter(self, record):
    from_orbax = os.sep + "orbax" + os.sep in (getattr(record, "pathname", "") or "")
    return not (record.name == "asyncio" or (from_orbax and record.levelno >= logging.ERROR))


_FILTER = _OrbaxErrors()
_LOGGERS = ("absl", "asyncio")


def _restore_leftover(unraisable):
  """Whether an unraisable exception is what a failed restore leaves behind.

  Once one array read fails, Orbax's other read coroutines are never awaited; Python reports
  each ("Exception ignored in: <coroutine object _read_array_index_and_device_put>", 60 lines
  with a TensorStore spec) whenever it is collected, which may be at exit; and TensorStore may
  still complete reads into a closed event loop.
  """
  code = getattr(unraisable.object, "cr_code", None)
  exc = unraisable.exc_value
  return (os.sep + "orbax" + os.sep in (getattr(code, "co_filename", "") or "")
          or "Encountered error while reading array index" in str(exc)
          or (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"))


def _drop_restore_leftovers():
  """From now on, for the whole process, drops the leftovers of failed restores (only those)."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_restore_leftovers", False):
    return

  def hook(unraisable):
    if not _restore_leftover(unraisable):
      previous(unraisable)
  hook.drops_restore_leftovers = True
  sys.unraisablehook = hook


def quiet_orbax_for_process():
  """Keeps Orbax's error records and failed restores' leftovers off stderr, process-wide.

  For command lines, which report every checkpoint failure in one line of their own.
  ``JAXEMBED_DEBUG=1`` keeps them.
  """
  if os.environ.get("JAXEMBED_DEBUG"):
    return
  for name in _LOGGERS:
    if _FILTER not in logging.getLogger(name).filters:
      logging.getLogger(name).addFilter(_FILTER)
  _drop_restore_leftovers()


@contextlib.contextmanager
def quiet_orbax():
  """The same for one block (a restore attempt), and the leftovers of a failed one from then on."""
  if os.environ.get("JAXEMBED_DEBUG"):
    yield
    return
  added = [lg for lg in map(logging.getLogger, _LOGGERS) if _FILTER not in lg.filters]
  for lg in added:
    lg.addFilter(_FILTER)
  try:
    yield
  except Exception:
    _drop_restore_leftovers()
    gc.collect()  # most leftovers go now, the others whenever their loop lets go of them
    raise
  finally:
    for lg in added:
      lg.removeFilter(_FILTER)
