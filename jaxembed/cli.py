"""What every command line of jaxembed shares: help, flag parsing, shipped configs, one-line errors.

A command's help (``--help``, ``-h``, ``--helpfull``) prints its docstring
and flags and exits 0; a bad flag, an unknown config and a user error end
with one line ``error: ...`` and exit status 2, never a traceback. Nothing
here imports JAX or TensorFlow, so help and flag errors answer at once.
A run stopped by a signal (jaxembed.preempt.Stopped) prints its own line and
exits with 128 + the signal's number (143 SIGTERM, 130 SIGINT).
"""

import argparse
import ast
import difflib
import importlib.util
import logging as std_logging
import os
import signal
import sys
import threading

from absl import flags
from absl import logging

USAGE_ERROR = 2
# The user errors every command reports in one line (DataError, WorkdirError and
# ConfigError are ValueErrors).
USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError)
HELP_ARGS = {"-h": "short", "--help": "short", "-help": "short", "-?": "short",
             "--helpshort": "short", "--helpfull": "full"}
# Brings back TensorFlow's C++ start-up lines (also --verbosity=1 or more).
TF_LOGS_ENV = "JAXEMBED_TF_LOGS"


def fail(message):
  """Prints ``error: message`` to stderr and exits with status 2."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(USAGE_ERROR)


def prog():
  """The command as the user typed it: ``jaxembed train`` or ``python -m jaxembed.train``."""
  name = sys.argv[0] if sys.argv and sys.argv[0] else "jaxembed"
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  if name.endswith(".py") and spec is not None:
    return f"python -m {spec.name}"
  return name


def quiet_startup(args):
  """Keeps TensorFlow's C++ start-up lines out of a run, unless asked for.

  Only TFDS datasets prepared as TFRecord files and ``logging.writer='clu'``
  import TensorFlow. When they do, TF_CPP_MIN_LOG_LEVEL=3 hides its
  cpu_feature_guard lines but not port.cc's "oneDNN custom operations are on"
  (printed twice per import); only TF_ENABLE_ONEDNN_OPTS=0 removes that one
  (measured, docs/BENCHMARKS.md). Both must be set before TensorFlow's first
  import, hence at the start of every command; both are defaults (a value the
  user set wins), and ``--verbosity=1`` or more or JAXEMBED_TF_LOGS=1 leave
  them unset.
  """
  if not verbose(args):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def verbose(args):
  """True when ``--verbosity=1`` or more (absl's flag) or JAXEMBED_TF_LOGS=1 asks for more lines."""
  for a in args:
    if a == "--":
      break
    key, _, value = a.partition("=")
    if key in ("--verbosity", "-v") and value.lstrip("-").isdigit() and int(value) >= 1:
      return True
  return os.environ.get(TF_LOGS_ENV, "") not in ("", "0")


class _NoOrbaxNotices(std_logging.Filter):
  """Drops Orbax's warnings below ERROR from a command's output.

  Orbax warns through absl on every read-only CheckpointManager ("Given
  directory is read only=..."), which is how export and search load a run on
  purpose; the user can do nothing about it. ``--verbosity=1`` keeps them.
  """

  def filter(self, record):
    return record.levelno >= std_logging.ERROR or f"{os.sep}orbax{os.sep}" not in record.pathname


# ------------------------------------------------------------------ shipped configs


def configs_dir():
  """The folder of the shipped configs (the package jaxembed.configs; configs/ in a checkout)."""
  spec = importlib.util.find_spec("jaxembed.configs")
  return list(spec.submodule_search_locations)[0]


def shipped_configs():
  """{name: first docstring line} of every shipped config file (one with ``get_config``).

  The files are parsed, not imported: listing them costs milliseconds, and a
  new file in configs/ appears here without being registered.
  """
  folder = configs_dir()
  out = {}
  for fname in sorted(os.listdir(folder)):
    if not fname.endswith(".py") or fname.startswith("_"):
      continue
    with open(os.path.join(folder, fname), encoding="utf-8") as f:
      tree = ast.parse(f.read(), fname)
    if any(isinstance(n, ast.FunctionDef) and n.name == "get_config" for n in tree.body):
      doc = (ast.get_docstring(tree) or "").strip()
      out[fname[:-3]] = doc.splitlines()[0] if doc else ""
  return out


def config_path(value):
  """``--config`` value -> the file (with ``:ARGS``) ml_collections loads.

  A shipped name (``digits``, ``digits:smoke``, ``medmnist:breastmnist,cpu``)
  becomes that file of jaxembed.configs; a path (``my_config.py:arg``, one
  with a directory, an existing file) stays as it is; anything else is an
  unknown name: one line listing the known ones, exit status 2.
  """
  name, sep, args = value.partition(":")
  if "/" in name or os.sep in name or name.endswith(".py"):
    return value
  known = shipped_configs()
  if name in known:
    return os.path.join(configs_dir(), name + ".py") + sep + args
  if os.path.isfile(name):
    return value
  near = difflib.get_close_matches(name, known, n=1)
  fail(f"unknown config {name!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
       + f"; known configs: {', '.join(known)}; or a config file, e.g. my_config.py[:ARGS]")


def resolve_config_args(args, flag="config"):
  """``args`` with the value of ``--config NAME[:ARGS]`` made a path (``config_path``)."""
  args = list(args)
  for i, a in enumerate(args):
    if a == "--":
      break
    if a.startswith(f"--{flag}="):
      args[i] = f"--{flag}=" + config_path(a.split("=", 1)[1])
    elif a == f"--{flag}" and i + 1 < len(args):
      args[i + 1] = config_path(args[i + 1])
  return args


def config_fields_help():
  """Where the config fields are listed (the end of ``jaxembed train --help``)."""
  return ("config fields: any field of the config can be set with --config.FIELD=VALUE, e.g. "
          "--config.batch_size=64 or --config.stages.epochs=\"(40,10,60)\"; every field, its "
          f"default and its meaning are listed in {os.path.join(configs_dir(), 'common.py')}. "
          "`jaxembed configs` lists the shipped configs.")


# ---------------------------------------------------------------------- help


def wants_help(args):
  """"short" or "full" when ``args`` ask for help (before a ``--``), else None."""
  for a in args:
    if a == "--":
      return None
    key, _, value = a.partition("=")
    if key in HELP_ARGS and value.lower() not in ("false", "0"):
      return HELP_ARGS[key]
  return None


def _flags_key(module_name):
  """The key of FLAGS.flags_by_module_dict() under which ``module_name`` defined its flags.

  absl files flags under the defining module's name, or under sys.argv[0]
  (the file's path) when that module runs as ``__main__`` (python -m).
  """
  by_module = flags.FLAGS.flags_by_module_dict()
  module = sys.modules.get(module_name)
  for key in (module_name, getattr(module, "__file__", None), sys.argv[0] if sys.argv else None):
    if key in by_module:
      return key
  return None


def known_flags(module_name):
  """The command's own flags, ``--name`` each, in the order defined."""
  defined = flags.FLAGS.flags_by_module_dict().get(_flags_key(module_name), [])
  return [f"--{f.name}" for f in defined]


def print_help(module_name, full=False, extra=None):
  """Usage, the module's docstring and its flags; ``full`` adds absl's flags (--verbosity ...)."""
  key = _flags_key(module_name)
  doc = (sys.modules[module_name].__doc__ or "").strip().replace("``", "")
  print(f"usage: {prog()} [--flag=value ...]\n")
  if doc:
    print(doc + "\n")
  print("flags:")
  print(flags.FLAGS.module_help(key) if key else "  (none)")
  if extra:
    print("\n" + extra)
  if full:
    for name in sorted(flags.FLAGS.flags_by_module_dict()):
      if name != key:
        print(f"\n{flags.FLAGS.module_help(name)}")
  else:
    print("\n--helpfull also lists absl's flags (--verbosity, ...).")


# ----------------------------------------------------------------------- run


def run(main, argv=None, user_errors=USER_ERRORS, help_extra=None):
  """Parses the absl flags in ``argv`` and runs ``main``; returns 0 or exits with the status.

  Args:
    main: ``main(argv)`` of an absl command, called with the program name and
      what is left after the flags (must be nothing else).
    argv: the program name and the command's arguments (default sys.argv);
      help and errors name the program as typed (``prog()``).
    user_errors: exception types that end the command with ``error: <message>``
      and exit status 2 instead of a traceback.
    help_extra: text printed at the end of ``--help``.

  Help returns 0; a flag error exits 2 with one line naming the flag and the
  known ones. An exception whose class has an ``exit_status`` attribute ends
  the command with ``error: <message>`` and that status, whichever command
  raised it: the place to give an exception type its own exit status (a
  signal's 143 or 130) without importing it here; ``user_errors`` exit 2.
  """
  args = list(sys.argv[1:] if argv is None else argv[1:])
  quiet_startup(args)
  module_name = main.__module__
  mode = wants_help(args)
  if mode:
    print_help(module_name, mode == "full", help_extra)
    return 0
  args = resolve_config_args(args)
  try:
    rest = flags.FLAGS([prog()] + args)
  except flags.UnrecognizedFlagError as e:
    hint = str(e).split(". Did you mean: ")
    near = f" (did you mean --{hint[1].rstrip(' ?')}?)" if len(hint) > 1 else ""
    fail(f"unknown flag --{e.flagname}{near}; known flags: {', '.join(known_flags(module_name))}"
         f"; see {prog()} --help")
  except flags.Error as e:
    fail(_flag_message(e))
  except (AttributeError, KeyError) as e:  # an override of a field the config does not have
    fail(f"unknown config field {str(e).strip(chr(34))} in an override; every field is listed in "
         f"{os.path.join(configs_dir(), 'common.py')}")
  except Exception as e:  # pylint: disable=broad-except  # a config file may raise anything
    fail(f"{type(e).__name__}: {_flag_message(e)}")
  if len(rest) > 1:
    fail(f"unexpected arguments {rest[1:]}; every option is a --flag (see {prog()} --help)")
  logging.use_absl_handler()
  if not verbose(args):
    logging.get_absl_handler().addFilter(_NoOrbaxNotices())
  # Deferred: checkpoint and preempt import JAX and Orbax (1.7 s measured), which help and
  # flag errors above must not wait for.
  from jaxembed import checkpoint  # pylint: disable=g-import-not-at-top
  from jaxembed import preempt  # pylint: disable=g-import-not-at-top
  checkpoint.quiet_orbax_for_process()  # checkpoint failures are reported in one line below
  threading.excepthook = _thread_warning
  try:
    main(rest)
  except preempt.Stopped as e:  # a signal: its own line and 128 + the signal's number
    for signum in (signal.SIGINT, signal.SIGTERM):  # more signals while JAX shuts down (seconds)
      signal.signal(signum, signal.SIG_IGN)
    print(e, file=sys.stderr, flush=True)
    sys.exit(e.status)
  except KeyboardInterrupt:  # Ctrl-C outside training (which handles it itself)
    print("interrupted", file=sys.stderr, flush=True)
    sys.exit(128 + signal.SIGINT)
  except Exception as e:  # pylint: disable=broad-except
    status = getattr(type(e), "exit_status", None)
    if status is None and isinstance(e, user_errors):
      status = USAGE_ERROR
    if status is None and isinstance(e, OSError):  # disk full, permission lost, ...
      fail(f"{e.strerror or e}{f' ({e.filename})' if e.filename else ''}")
    if status is None:
      raise
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(status)
  return 0


class ArgumentParser(argparse.ArgumentParser):
  """argparse for jaxembed's commands: ``prog`` as typed, a usage error in one line, exit 2.

  An unknown ``--flag`` is named before anything else (argparse would first
  complain about a missing required one), and flags are not abbreviated.
  """

  def __init__(self, **kwargs):
    kwargs.setdefault("prog", prog())
    kwargs.setdefault("allow_abbrev", False)
    super().__init__(**kwargs)

  def known_flags(self):
    return [o for a in self._actions for o in a.option_strings
            if o.startswith("--") and o != "--help"]

  def parse_args(self, args=None, namespace=None):  # pylint: disable=signature-differs
    args = list(sys.argv[1:] if args is None else args)
    quiet_startup(args)
    if not wants_help(args):
      known = set(self.known_flags())
      for a in args:
        if a == "--":
          break
        if a.startswith("--") and a.split("=", 1)[0] not in known:
          near = difflib.get_close_matches(a.split("=", 1)[0], known, n=1)
          self.error(f"unknown flag {a.split('=', 1)[0]}"
                     + (f" (did you mean {near[0]}?)" if near else ""))
    return super().parse_args(args, namespace)

  def error(self, message):
    fail(f"{message}; known flags: {', '.join(self.known_flags())}; see {self.prog} --help")


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
