"""Stopping training on SIGTERM or SIGINT at a step that every process agrees on.

Cloud TPU VMs, spot GPUs and SLURM announce the end of a job with SIGTERM and a grace period
(30 s by default on GCE and in SLURM's KillWait); Ctrl-C sends SIGINT. Inside a
:class:`StopRequest` the first of them is recorded, the training loop asks
:meth:`StopRequest.should_stop` after every step, saves a checkpoint at the step it reached and
raises :meth:`StopRequest.stopped`; the command line prints its one line and exits with
128 + the signal's number (143 for SIGTERM, 130 for SIGINT). Later signals are answered with a
line and otherwise ignored: interrupting Orbax while it writes loses the checkpoint.

Until the first step has run there is nothing to save and data loading or compiling may take
minutes, so a signal then stops a single process at once (:meth:`StopRequest.defer` ends that
phase).

Several processes must stop at the same step, or the others wait forever in the next
collective. ``jax.distributed.initialize`` starts JAX's preemption service unless
``jax_enable_preemption_service`` is off: a C++ SIGTERM handler of its own (invisible to
``signal.getsignal``) tells every process, and
``multihost_utils.reached_preemption_sync_point(step)`` is True on all of them at the same
step, a few steps after the signal. A Python SIGTERM handler would replace the C++ one, so
with the service SIGTERM is left to it and SIGINT is passed on to it as SIGTERM. Without the
service the processes all-gather their flags every ``every`` steps (2-4 ms per all-gather on
two CPU cores, measured for issue #22: too much for every step).
"""

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils
import numpy as np


class Stopped(Exception):
  """Training stopped on a signal. ``status``: the exit status; ``str()``: the line to print.

  ``step`` is the step whose checkpoint was saved in ``directory`` (None: stopped before
  training started, nothing saved).
  """

  def __init__(self, signum, message, step=None, total_steps=None, directory=None):
    super().__init__(message)
    self.signum = signum
    self.status = 128 + int(signum)
    self.step, self.total_steps, self.directory = step, total_steps, directory


def preemption_service():
  """Whether JAX's preemption service runs (multi-process runs; on by default)."""
  return (jax.process_count() > 1 and jax.distributed.is_initialized()
          and bool(jax.config.jax_enable_preemption_service))


class StopRequest:
  """SIGTERM and SIGINT become a request to stop; the previous handlers come back on exit.

  Args:
    every: without the preemption service, several processes compare their flags every
      ``every`` steps (the trainer's logging interval, where it waits for the devices anyway).
  """

  def __init__(self, every=1):
    self.every = max(1, int(every))
    self.signum = None          # the signal that asked to stop (a peer's, in several processes)
    self.repeated = []          # signals received after it
    self._immediate = True
    self._service = False
    self._previous = {}

  def __enter__(self):
    # Python runs handlers in the main thread only (signal.signal raises elsewhere, e.g. when
    # the estimator's fit runs in a worker thread): there the defaults stay.
    if threading.current_thread() is not threading.main_thread():
      return self
    self._service = preemption_service()
    # One process leaving before training would leave the others waiting in a collective.
    self._immediate = jax.process_count() == 1
    signums = [signal.SIGINT] if self._service else [signal.SIGINT, signal.SIGTERM]
    for s in signums:
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()
    return False

  def defer(self, step):
    """From now on a signal stops at the end of a step; ``step``: the step training starts at.

    With the preemption service, ``step`` is passed to it: it counts from there.
    """
    self._immediate = False
    if self._service:
      multihost_utils.reached_preemption_sync_point(step)

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.signum is not None:
      self.repeated.append(signum)
      # os.write, not print: a handler may interrupt a print and re-enter its buffer.
      os.write(2, f"{name} received again: already stopping, please wait\n".encode())
      return
    self.signum = signum
    if self._service and signum != signal.SIGTERM:
      os.kill(os.getpid(), signal.SIGTERM)  # the service's handler starts the agreement
    if self._immediate:
      raise Stopped(signum, f"stopped before training started ({name}); nothing was trained in "
                    "this invocation, so there is nothing new to save")

  def should_stop(self, step):
    """True, on every process at the same ``step``, once any process has been signalled.

    Call it after every step, on every process, with the same step numbers.
    """
    if jax.process_count() == 1:
      return self.signum is not None
    if self._service:
      return multihost_utils.reached_preemption_sync_point(step)
    if step % self.every:
      return False
    flags = np.ravel(multihost_utils.process_allgather(np.int32(self.signum or 0)))
    if self.signum is None and flags.any():
      self.signum = int(flags[np.flatnonzero(flags)[0]])  # a peer's: exit as it does
    return bool(flags.any())

  def stopped(self, step, total_steps, directory):
    """The :class:`Stopped` to raise once the checkpoint at ``step`` is saved in ``directory``."""
    signum = self.signum or signal.SIGTERM  # the service tells no signal: it is a SIGTERM
    return Stopped(signum, f"stopped at step {step} of {total_steps}; checkpoint saved in "
                   f"{directory}; run the same command to resume", step, total_steps, directory)
