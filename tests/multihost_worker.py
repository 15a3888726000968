"""One process of the two-process tests in multihost_test.py (not a test module itself).

``python tests/multihost_worker.py loss OUT.npz`` joins the run described by
the JAXEMBED_* environment variables, computes both losses and their
gradients on a fixed global batch sharded over all processes' devices, and
process 0 writes them to OUT.npz. Run without those variables it does the
same in one process (the reference).
"""

import sys

import jax
import numpy as np

from jaxembed import losses, parallel

BATCH, DIM = 64, 2


def global_batch():
  """The same (z1, z2) in every process: a fixed seed, spread over +-10."""
  rng = np.random.default_rng(0)
  return (rng.normal(size=(BATCH, DIM)) * 5).astype(np.float32), \
         (rng.normal(size=(BATCH, DIM)) * 5).astype(np.float32)


def loss_and_grads(out_path):
  mesh = parallel.make_mesh()
  z1, z2 = (parallel.global_from_full(mesh, z) for z in global_batch())
  results = {}
  variants = {
      "cauchy": losses.cauchy_infonce,
      "cauchy_sharded": lambda a, b: losses.cauchy_infonce(a, b, mesh=mesh, block_size=16),
      "cosine": lambda a, b: losses.cosine_infonce(a, b, 0.5),
      "cosine_sharded": lambda a, b: losses.cosine_infonce(a, b, 0.5, mesh=mesh),
  }
  for name, fn in variants.items():
    value, (g1, g2) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(z1, z2)
    # Block on each result: processes that race ahead into the next
    # collective program have been seen to hang.
    jax.block_until_ready((value, g1, g2))
    results[name] = float(parallel.to_host(value))
    results[name + "_grad1"] = parallel.to_host(g1)
    results[name + "_grad2"] = parallel.to_host(g2)
  results["process_count"] = jax.process_count()
  results["device_count"] = jax.device_count()
  if parallel.is_main_process():
    np.savez(out_path, **results)


def main(argv):
  mode, out_path = argv[1], argv[2]
  joined = parallel.initialize()
  print(f"process {jax.process_index()}/{jax.process_count()} joined={joined} "
        f"devices {jax.local_device_count()} local / {jax.device_count()} global", flush=True)
  if mode == "loss":
    loss_and_grads(out_path)
  else:
    raise ValueError(f"unknown mode {mode!r}; use 'loss'")


if __name__ == "__main__":
  main(sys.argv)
