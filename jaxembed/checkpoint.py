"""Orbax checkpoints of the training state: save every N steps and at stage ends, restore the newest.

Orbax writes each checkpoint into a temporary folder and renames it when
complete, so a process killed at any moment leaves only whole checkpoints
behind; the newest of those is where a restarted run continues.
"""

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

_policy = checkpoint_managers.preservation_policy


def create_manager(directory, keep, stage_end_steps, async_save=True):
  """A CheckpointManager keeping the newest ``keep`` checkpoints plus every stage end."""
  policy = _policy.AnyPreservationPolicy([
      _policy.LatestN(n=max(1, keep)),
      _policy.CustomSteps(steps=list(stage_end_steps)),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
      create=True,
  )
  return ocp.CheckpointManager(directory, options=options)


def open_manager(directory):
  """A read-only manager over an existing checkpoint folder (export, search)."""
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))


def save(manager, step, state):
  manager.save(step, args=ocp.args.StandardSave(state), force=True)


def abstract_like(state):
  """ShapeDtypeStructs with the shardings of ``state``: a restore target."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state)


def restore(manager, step, target_state):
  """Restores checkpoint ``step`` into the structure, dtypes and shardings of ``target_state``."""
  return manager.restore(step, args=ocp.args.StandardRestore(abstract_like(target_state)))
