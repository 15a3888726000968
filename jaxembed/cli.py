"""What every command line of jaxembed shares: flag parsing and one-line errors with exit status 2."""

import os
import sys

USAGE_ERROR = 2


def fail(message):
  """Prints ``error: message`` to stderr and exits with status 2."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(USAGE_ERROR)


def run(main, argv=None, user_errors=(ValueError, TypeError, KeyError, FileNotFoundError)):
  """Parses absl flags and runs ``main``; bad flags and ``user_errors`` exit 2 with one line.

  absl's own ``app.run`` reports a bad flag (unknown --config.field, a value
  of the wrong type, a config file that fails to load) with a traceback and
  exit status 1; users need the message only.
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  argv = list(sys.argv if argv is None else argv)
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    fail(_first_line(e))
  except Exception as e:  # a config file may raise anything while loading  # pylint: disable=broad-except
    fail(f"{type(e).__name__}: {_first_line(e)}")
  if len(rest) > 1:
    fail(f"unexpected arguments {rest[1:]}; every option is a --flag (see --help)")
  logging.use_absl_handler()
  try:
    return main(rest)
  except user_errors as e:
    fail(str(e))


def _first_line(e):
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__
