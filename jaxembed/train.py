"""Command line of training: ``python -m jaxembed.train --config FILE[:ARGS] --workdir DIR``.

Trains t-SimCNE as the config says, resuming from the newest checkpoint in
DIR if there is one, and writes the outputs of DESIGN.md 3b into DIR. Any
config field can be overridden, e.g. ``--config.batch_size=128``.
"""

from absl import flags
from ml_collections import config_flags

from jaxembed import cli
from jaxembed import configlib
from jaxembed import parallel
from jaxembed import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/digits.py or configs/medmnist.py:bloodmnist.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")


def main(argv):
  del argv
  config = cli.load_config(_CONFIG)
  if config is None:
    cli.fail("--config is required, e.g. --config configs/digits.py")
  if not _WORKDIR.value:
    cli.fail("--workdir is required, e.g. --workdir runs/digits")
  if configlib.train_option(config, "deterministic"):
    # XLA reads XLA_FLAGS when the backend starts: before initialize() and any computation.
    parallel.enable_deterministic_ops()
  parallel.initialize()
  trainer.train_and_evaluate(config, _WORKDIR.value)


def run():
  cli.run(main, user_errors=(ValueError, TypeError, KeyError, FileNotFoundError,
                             trainer.TrainingError))


if __name__ == "__main__":
  run()
