"""One process of the two-process stop test in preempt_test.py (not a test module itself).

``python tests/preempt_worker.py CKDIR`` joins the run described by the JAXEMBED_* variables
and runs "training" steps without a model: each step is a jitted update of a small replicated
state whose loss is a mean over a batch sharded across both processes (a cross-process
all-reduce, so the processes run in lock step). After every step it asks
``StopRequest.should_stop``; when told to stop it saves the state with
``jaxembed.checkpoint.save`` in CKDIR, prints ``stopped at step N`` and exits with the status
of ``preempt.Stopped`` (143 SIGTERM, 130 SIGINT). Each process prints ``step N`` as it goes.
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxembed import checkpoint
from jaxembed import parallel
from jaxembed import preempt

STEPS = 3000


def main(ckdir):
  parallel.initialize()
  print(f"preemption service: {preempt.preemption_service()}", flush=True)
  mesh = parallel.make_mesh()
  state = parallel.replicate(mesh, {"w": jnp.ones((16,), jnp.float32),
                                    "step": jnp.asarray(0, jnp.int32)})

  @jax.jit
  def step_fn(state, batch):
    loss = lambda w: jnp.mean((batch @ w) ** 2)  # the mean over both processes' rows
    return {"w": state["w"] - 0.01 * jax.grad(loss)(state["w"]), "step": state["step"] + 1}

  rng = np.random.default_rng(0)  # the same global batch in every process
  with preempt.StopRequest(every=2) as stop, \
      checkpoint.closing(checkpoint.create_manager(ckdir, 2, [])) as manager:
    stop.defer(0)
    for step in range(1, STEPS + 1):
      batch = parallel.global_from_full(mesh, rng.normal(size=(16, 16)).astype(np.float32))
      state = step_fn(state, batch)
      jax.block_until_ready(state)
      print(f"step {step}", flush=True)
      if stop.should_stop(step):
        checkpoint.save(manager, step, state)
        checkpoint.wait(manager)
        print(f"stopped at step {step}", flush=True)
        stopped = stop.stopped(step, STEPS, ckdir)
        break
      time.sleep(0.01)
    else:
      return 0
  return stopped.status


if __name__ == "__main__":
  sys.exit(main(sys.argv[1]))
