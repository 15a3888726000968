"""What every command line of jaxembed shares: flag parsing and one-line errors with exit status 2.

A run stopped by a signal (jaxembed.preempt.Stopped) prints its line and exits with 128 + the
signal's number (143 SIGTERM, 130 SIGINT).
"""

import os
import signal
import sys
import threading

from absl import flags
from absl import logging

from jaxembed import checkpoint
from jaxembed import preempt

# TensorFlow's C++ start-up lines (oneDNN, cpu features), should anything
# import it: the variable must be set before that import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

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
  argv = list(sys.argv if argv is None else argv)
  try:
    rest = flags.FLAGS(argv)
  except flags.UnrecognizedFlagError as e:
    fail(f"{e}; config fields are listed in configs/common.py")
  except flags.Error as e:
    fail(_flag_message(e))
  except (AttributeError, KeyError) as e:  # an override of a field the config does not have
    fail(f"unknown config field {str(e).strip(chr(34))} in an override; config fields are "
         "listed in configs/common.py")
  except Exception as e:  # a config file may raise anything while loading  # pylint: disable=broad-except
    fail(f"{type(e).__name__}: {_flag_message(e)}")
  if len(rest) > 1:
    fail(f"unexpected arguments {rest[1:]}; every option is a --flag (see --help)")
  logging.use_absl_handler()
  checkpoint.quiet_orbax_for_process()  # checkpoint failures are reported in one line below
  threading.excepthook = _thread_warning
  try:
    return main(rest)
  except preempt.Stopped as e:
    for signum in (signal.SIGINT, signal.SIGTERM):  # more signals while JAX shuts down (seconds)
      signal.signal(signum, signal.SIG_IGN)
    print(e, file=sys.stderr, flush=True)
    sys.exit(e.status)
  except user_errors as e:
    fail(str(e))
  except OSError as e:  # disk full, permission lost, writing the run's files
    fail(f"{e.strerror or e}{f' ({e.filename})' if e.filename else ''}")
  except KeyboardInterrupt:  # Ctrl-C outside training (which handles it itself)
    print("interrupted", file=sys.stderr, flush=True)
    sys.exit(128 + signal.SIGINT)


def _thread_warning(args):
  """One line instead of a traceback for a background thread that failed.

  E.g. TensorBoard's event writer on a full disk: the main thread reports the cause itself.
  """
  if args.exc_type is not SystemExit:
    name = args.thread.name if args.thread is not None else "a thread"
    first = (str(args.exc_value).strip().splitlines() or [""])[0]
    print(f"warning: {name} failed: {args.exc_type.__name__}: {first}", file=sys.stderr,
          flush=True)


def load_config(holder):
  """Materialises a ``config_flags`` config; a file that fails to load exits 2 with its reason.

  ml_collections loads config files lazily, on first access, so its errors
  (a missing file, an unknown variant) surface here rather than at parsing.
  """
  try:
    config = holder.value
    if config is None:
      return None
    return config.copy_and_resolve_references()
  except Exception as e:  # pylint: disable=broad-except
    cause = e.__cause__ or e
    lines = [l.strip() for l in str(cause).splitlines() if l.strip()]
    if "No such file" in str(cause):
      fail(f"config file not found: {lines[-1]}")
    fail(f"cannot load the config: {type(cause).__name__}: {' '.join(lines[-2:])}")


def _flag_message(e):
  """The flag and the final exception line of absl's message (which may embed a traceback)."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  if not lines:
    return type(e).__name__
  if len(lines) > 1 and any(l.startswith("Traceback") for l in lines):
    return f"{lines[0].split(': Error')[0]}: {lines[-1]}"
  return lines[0]
