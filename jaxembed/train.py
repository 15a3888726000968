"""Training: ``jaxembed train --config NAME[:ARGS] --workdir DIR`` (``python -m jaxembed.train``).

Trains t-SimCNE as the config says, resuming from the newest checkpoint in
DIR if there is one, and writes the outputs of DESIGN.md 3b into DIR.
``--config`` takes a shipped config by name (``digits``, ``digits:smoke``,
``medmnist:breastmnist,cpu``; ``jaxembed configs`` lists them) or a config
file, ``path/to/my_config.py[:ARGS]``. Any config field can be overridden,
e.g. ``--config.batch_size=128``.
"""

import sys

from absl import flags
from ml_collections import config_flags

from jaxembed import cli
from jaxembed import extras

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A shipped config by name (digits, digits:smoke, medmnist:breastmnist,cpu; "
    "`jaxembed configs` lists them) or a config file, path/to/my_config.py[:ARGS].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")


def main(argv):
  del argv
  config = cli.load_config(_CONFIG)
  if config is None:
    cli.fail("--config is required, e.g. --config digits (`jaxembed configs` lists the configs)")
  if not _WORKDIR.value:
    cli.fail("--workdir is required, e.g. --workdir runs/digits")
  if config.logging.get("writer") == "clu":
    extras.tensorflow('logging.writer="clu"')  # before anything is written, not at the writer
  # Deferred: these import JAX, Flax, Optax and Orbax (3.3 s of the 3.4 s that importing this
  # module took when they were at the top, 2 idle cores); help and flag errors answer without them.
  from jaxembed import configlib  # pylint: disable=g-import-not-at-top
  from jaxembed import parallel  # pylint: disable=g-import-not-at-top
  from jaxembed import trainer  # pylint: disable=g-import-not-at-top
  if configlib.train_option(config, "deterministic"):
    # XLA reads XLA_FLAGS when the backend starts: before initialize() and any computation.
    parallel.enable_deterministic_ops()
  parallel.initialize()
  try:
    trainer.train_and_evaluate(config, _WORKDIR.value)
  except trainer.TrainingError as e:
    cli.fail(str(e))


def run(argv=None):
  """``jaxembed train`` with ``argv`` (default sys.argv[1:]); returns the exit status."""
  return cli.run(main, None if argv is None else [cli.prog(), *argv],
                 help_extra=cli.config_fields_help())


if __name__ == "__main__":
  sys.exit(run())
