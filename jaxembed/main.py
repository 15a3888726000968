"""The ``jaxembed`` command: training, export, search, clustering and the shipped configs, one tool.

  jaxembed train   --config digits --workdir runs/digits
  jaxembed export  --workdir runs/digits
  jaxembed search  --workdir runs/digits --query digits:1700
  jaxembed cluster --workdir runs/digits
  jaxembed baselines --workdir runs/digits
  jaxembed configs

``jaxembed CMD --help`` lists the flags of a command. ``python -m
jaxembed.train`` (and ``.export``, ``.search``, ``.cluster``, ``.baselines``) are the same
commands.

A command is one line of ``COMMANDS``: its name, the function that runs it
as ``"module:function"`` and a summary for ``jaxembed --help``. The module is
imported only when its command is chosen (the commands define flags of the
same names, which one process cannot define twice, and their libraries take
seconds to import). The function is called with the command's arguments (a
list without the program name; sys.argv[0] is set to ``jaxembed CMD`` for
help and errors) and returns the exit status (None counts as 0); an
argparse command uses ``jaxembed.cli.ArgumentParser`` for one-line errors.
"""

import difflib
import importlib
import sys

from jaxembed import cli
from jaxembed import version

COMMANDS = {
    "train": ("jaxembed.train:run", "train t-SimCNE as a config says, into --workdir (resumes)"),
    "export": ("jaxembed.commands.export:run",
               "embed a run's images or new ones: map, features, tables, plots, HTML page"),
    "search": ("jaxembed.commands.search:run",
               "nearest neighbours of an image or id in a trained run"),
    "cluster": ("jaxembed.commands.cluster:run",
                "clusters on a finished run's map, scored against labels, with a picture sheet"),
    "baselines": ("jaxembed.commands.baselines:run",
                  "PCA, t-SNE and UMAP of the backbone before training beside the t-SimCNE map"),
    "configs": ("jaxembed.main:list_configs",
                "list the shipped configs (for --config NAME[:ARGS]) with their first line"),
}


def usage():
  width = max(map(len, COMMANDS))
  lines = ["usage: jaxembed <command> [--flag=value ...]", "", "commands:"]
  lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
  lines += ["", "`jaxembed <command> --help` lists the flags of a command; "
            "`jaxembed --version` prints the version."]
  return "\n".join(lines)


def list_configs(args):
  """``jaxembed configs``: each shipped config with the first line of its docstring."""
  if cli.wants_help(args):
    print(f"usage: {cli.prog()}\n\nLists each shipped config (for --config NAME[:ARGS]) with the "
          "first line of its docstring.")
    return 0
  if args:
    cli.fail(f"{cli.prog()} takes no arguments, got {' '.join(args)}")
  known = cli.shipped_configs()
  width = max(map(len, known))
  for name, line in known.items():
    print(f"{name:<{width}}  {line}")
  print(f"\nUse --config NAME or NAME:ARGS (e.g. digits:smoke, medmnist:breastmnist,cpu); the "
        f"files are in {cli.configs_dir()}, and common.py there lists every field.")
  return 0


def run_command(name, args=None, prog=None):
  """Runs command ``name`` with ``args`` (default sys.argv[1:]); returns its exit status."""
  args = list(sys.argv[1:] if args is None else args)
  target, _ = COMMANDS[name]
  # Before the command's module is imported: whatever imports TensorFlow must find these.
  cli.quiet_startup(args)
  sys.argv = [prog or f"jaxembed {name}"] + args
  module, function = target.split(":")
  status = getattr(importlib.import_module(module), function)(args)
  return 0 if status is None else status


def main(argv=None):
  """The console script: ``jaxembed <command> [args]``; returns the exit status."""
  args = list(sys.argv[1:] if argv is None else argv[1:])
  if not args:
    print(usage(), file=sys.stderr)
    return cli.USAGE_ERROR
  first, rest = args[0], args[1:]
  if first in cli.HELP_ARGS or first == "help":
    print(usage())
    return 0
  if first == "--version":
    print(f"jaxembed {version.__version__}")
    return 0
  if first not in COMMANDS:
    kind = "option" if first.startswith("-") else "command"
    near = [] if first.startswith("-") else difflib.get_close_matches(first, COMMANDS, 1)
    cli.fail(f"unknown {kind} {first!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
             + f"; known commands: {', '.join(COMMANDS)}; see jaxembed --help")
  return run_command(first, rest)


if __name__ == "__main__":
  sys.exit(main())
