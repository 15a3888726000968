"""The ``jaxembed`` command line: help, one-line errors, shipped config names, a quiet start-up."""

import importlib
import logging
import os
import subprocess
import sys

import pytest

from jaxembed import cli
from jaxembed import extras
from jaxembed import main
from jaxembed import summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every command with its flags, written out here (not read from the code), so that a flag that
# goes missing from a command or its help fails.
FLAGS = {
    "train": ["--config", "--workdir"],
    "export": ["--workdir", "--data", "--out", "--step", "--overwrite", "--plots", "--thumbnails",
               "--tables", "--duplicate_threshold", "--batch_size"],
    "search": ["--workdir", "--query", "--k", "--space", "--metric", "--embeddings", "--data",
               "--out", "--step"],
    "cluster": ["--workdir", "--outdir", "--method", "--n_clusters", "--k_min", "--k_max",
                "--criterion", "--min_cluster_size", "--seed", "--no_features", "--no_images"],
    "baselines": ["--workdir", "--outdir", "--methods", "--pretrained", "--pixels", "--no_pixels",
                  "--max_points", "--seed", "--overwrite"],
    "configs": [],
}

# Hides TensorFlow from a child process (see conftest.without_tensorflow) and reports at exit
# which of JAX, the trainer and TensorFlow it imported.
PRELUDE = """
import atexit, sys
class _NoTensorFlow:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] == "tensorflow":
      raise ModuleNotFoundError(name)
if HIDE_TF:
  sys.meta_path.insert(0, _NoTensorFlow())
atexit.register(lambda: print("imported:", *[m for m in ("jax", "jaxembed.trainer", "tensorflow")
                                             if m in sys.modules], file=sys.stderr))
"""


def jaxembed(*args, cwd=None, hide_tf=False, env=None, timeout=120):
  """``jaxembed ARGS`` (the console script's function) in a fresh process."""
  code = (f"HIDE_TF = {hide_tf}\n" + PRELUDE
          + "from jaxembed import main\nsys.exit(main.main(['jaxembed'] + sys.argv[1:]))")
  return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd or REPO,
                        env=dict(os.environ, **(env or {})), capture_output=True, text=True,
                        timeout=timeout)


def imported(proc):
  line = [l for l in proc.stderr.splitlines() if l.startswith("imported:")][-1]
  return line.split()[1:]


def lists_flag(text, flag):
  """absl shows a boolean flag as --[no]name."""
  return flag in text or flag.replace("--", "--[no]", 1) in text


def error_lines(proc):
  return [l for l in proc.stderr.splitlines() if not l.startswith("imported:")]


def test_every_command_has_its_flags_listed_here():
  assert set(main.COMMANDS) == set(FLAGS)


def test_top_level_help_usage_and_version():
  proc = jaxembed("--help")
  assert proc.returncode == 0, proc.stderr
  listed = [l.split()[0] for l in proc.stdout.splitlines() if l.startswith("  ")]
  assert listed == list(FLAGS)
  assert imported(proc) == []
  bare = jaxembed()
  assert bare.returncode == 2 and "usage: jaxembed <command>" in bare.stderr
  version = jaxembed("--version")
  assert version.returncode == 0
  assert version.stdout.split() == ["jaxembed", importlib.import_module("jaxembed").__version__]


@pytest.mark.parametrize("arg,what", [("trian", "command 'trian' (did you mean 'train'?)"),
                                      ("--bogus", "option '--bogus'")])
def test_unknown_command_is_one_line(arg, what):
  proc = jaxembed(arg)
  assert proc.returncode == 2
  lines = error_lines(proc)
  assert len(lines) == 1 and lines[0].startswith(f"error: unknown {what}")
  assert all(name in lines[0] for name in FLAGS)


@pytest.mark.parametrize("command", list(FLAGS))
@pytest.mark.parametrize("help_arg", ["--help", "-h"])
def test_command_help_lists_every_flag_without_importing_jax(command, help_arg):
  proc = jaxembed(command, help_arg)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith(f"usage: jaxembed {command}")
  for flag in FLAGS[command]:
    assert lists_flag(proc.stdout, flag), flag
  # Help answers at once: no JAX (1-3 s to import), no trainer, no TensorFlow.
  assert imported(proc) == []


def test_train_help_says_where_the_config_fields_are():
  proc = jaxembed("train", "--help")
  common = os.path.join(cli.configs_dir(), "common.py")
  assert f"every field, its default and its meaning are listed in {common}" in proc.stdout
  assert os.path.samefile(common, os.path.join(REPO, "configs", "common.py"))
  assert "--config.FIELD=VALUE" in proc.stdout and "jaxembed configs" in proc.stdout
  full = jaxembed("train", "--helpfull")
  assert full.returncode == 0 and "--verbosity" in full.stdout


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "export", "search", "cluster", "baselines"])
def test_python_m_forms_keep_working(command):
  proc = subprocess.run([sys.executable, "-m", f"jaxembed.{command}", "--help"], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith(f"usage: python -m jaxembed.{command}")
  for flag in FLAGS[command]:
    assert lists_flag(proc.stdout, flag), flag
  bad = subprocess.run([sys.executable, "-m", f"jaxembed.{command}", "--bogus"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]
  assert f"see python -m jaxembed.{command} --help" in bad.stderr


@pytest.mark.parametrize("command,args,expected", [
    ("train", ["--workdri", "x"], "unknown flag --workdri (did you mean --workdir?)"),
    ("export", ["--bogus"], "unknown flag --bogus"),
    ("search", ["--workdir", "x", "--kk=3"], "unknown flag --kk"),
    ("cluster", ["--workdri", "x"], "unknown flag --workdri (did you mean --workdir?)"),
    ("baselines", ["--workdri", "x"], "unknown flag --workdri (did you mean --workdir?)"),
    ("configs", ["--bogus"], "takes no arguments"),
])
def test_unknown_flag_is_one_line_naming_the_known_ones(command, args, expected):
  proc = jaxembed(command, *args)
  assert proc.returncode == 2, proc.stderr
  lines = error_lines(proc)
  assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
  assert all(flag in lines[0] for flag in FLAGS[command])
  assert imported(proc) == []


def test_unknown_config_name_lists_the_shipped_ones(tmp_path):
  proc = jaxembed("train", "--config", "digts:smoke", "--workdir", str(tmp_path / "w"))
  assert proc.returncode == 2
  lines = error_lines(proc)
  shipped = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs"))
                   if f.endswith(".py") and f != "__init__.py")
  assert len(lines) == 1 and lines[0].startswith("error: unknown config 'digts'")
  assert "did you mean 'digits'?" in lines[0] and all(name in lines[0] for name in shipped)
  assert not (tmp_path / "w").exists()


def test_config_names_resolve_to_the_shipped_files(tmp_path, monkeypatch):
  folder = os.path.join(REPO, "configs")
  assert os.path.samefile(cli.configs_dir(), folder)
  for value, file, args in [("digits", "digits.py", ""), ("digits:smoke", "digits.py", ":smoke"),
                            ("medmnist:breastmnist,cpu", "medmnist.py", ":breastmnist,cpu")]:
    path, _, rest = cli.config_path(value).rpartition(".py")
    assert os.path.samefile(path + ".py", os.path.join(folder, file)) and rest == args
  # Paths stay as they are; so does the name of a file that exists.
  monkeypatch.chdir(tmp_path)
  (tmp_path / "my_config").write_text("")
  for value in ["my_config.py:arg", "sub/digits.py", os.path.join(REPO, "configs", "digits.py"),
                "my_config:arg"]:
    assert cli.config_path(value) == value
  assert cli.resolve_config_args(["--config=digits:smoke", "--workdir", "w"])[0] == (
      "--config=" + os.path.join(cli.configs_dir(), "digits.py") + ":smoke")
  assert cli.resolve_config_args(["--config", "my.py", "--", "--config", "digits"]) == [
      "--config", "my.py", "--", "--config", "digits"]


def test_configs_command_lists_every_shipped_config():
  proc = jaxembed("configs")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  for fname in sorted(os.listdir(os.path.join(REPO, "configs"))):
    if not fname.endswith(".py") or fname == "__init__.py":
      continue
    doc = importlib.import_module(f"jaxembed.configs.{fname[:-3]}").__doc__
    assert f"{fname[:-3]}  " in "\n".join(lines)
    assert any(l.startswith(fname[:-3] + " ") and l.endswith(doc.strip().splitlines()[0])
               for l in lines), fname


def test_a_new_config_file_is_picked_up(tmp_path, monkeypatch):
  (tmp_path / "images.py").write_text('"""My images.\n\nMore."""\n\ndef get_config(arg=None):\n'
                                      '  return None\n')
  (tmp_path / "helpers.py").write_text('"""Not a config."""\n\nX = 1\n')
  (tmp_path / "__init__.py").write_text("")
  monkeypatch.setattr(cli, "configs_dir", lambda: str(tmp_path))
  assert cli.shipped_configs() == {"images": "My images."}
  assert cli.config_path("images:a,b") == str(tmp_path / "images.py") + ":a,b"


def test_quiet_startup_sets_tensorflow_defaults_unless_asked(monkeypatch):
  for name in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", cli.TF_LOGS_ENV):
    monkeypatch.delenv(name, raising=False)
  cli.quiet_startup(["--workdir", "w", "--", "--verbosity=1"])
  assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3" and os.environ["TF_ENABLE_ONEDNN_OPTS"] == "0"
  for args, env in [(["--verbosity=1"], {}), (["-v=2"], {}), ([], {cli.TF_LOGS_ENV: "1"})]:
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL")
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS")
    for k, v in env.items():
      monkeypatch.setenv(k, v)
    cli.quiet_startup(args)
    assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ and "TF_ENABLE_ONEDNN_OPTS" not in os.environ
    monkeypatch.delenv(cli.TF_LOGS_ENV, raising=False)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")  # the user's own setting wins
  cli.quiet_startup([])
  assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"


class Preempted(Exception):
  exit_status = 143


@pytest.mark.parametrize("raised,status,line", [
    (None, 0, None), (ValueError("bad value"), 2, "error: bad value"),
    (FileExistsError("out.npz exists"), 2, "error: out.npz exists"),
    (extras.MissingExtra("needs TensorFlow"), 2, "error: needs TensorFlow"),
    (Preempted("stopped at step 7"), 143, "error: stopped at step 7")])
def test_run_ends_with_one_line_and_the_exception_s_status(raised, status, line, capsys):
  def command(argv):
    assert argv == [cli.prog()]
    if raised:
      raise raised
  if status:
    with pytest.raises(SystemExit) as exit_info:
      cli.run(command, ["prog"])
    assert exit_info.value.code == status
  else:
    assert cli.run(command, ["prog"]) == 0
  err = capsys.readouterr().err.strip()
  assert err == (line or "")


def test_run_lets_bugs_through():
  def command(argv):
    raise RuntimeError("a bug")
  with pytest.raises(RuntimeError, match="a bug"):
    cli.run(command, ["prog"])


def test_search_command_metrics_are_the_library_s():
  from jaxembed import search  # pylint: disable=g-import-not-at-top
  from jaxembed.commands import search as search_command  # pylint: disable=g-import-not-at-top
  assert set(search_command.METRICS) == set(search.METRICS)


def test_clu_writer_without_tensorflow_names_the_extra(tmp_path, without_tensorflow):
  with pytest.raises(extras.MissingExtra, match='logging.writer="clu" needs TensorFlow, which is '
                     r'not installed: pip install "jaxembed\[tf\]"'):
    summary.create_writer(str(tmp_path), kind="clu")
  proc = jaxembed("train", "--config", "digits:smoke", "--config.logging.writer=clu",
                  "--workdir", str(tmp_path / "w"), hide_tf=True)
  assert proc.returncode == 2
  lines = error_lines(proc)
  assert len(lines) == 1 and 'pip install "jaxembed[tf]"' in lines[0], proc.stderr
  assert not (tmp_path / "w").exists()


def test_tensorboard_events_without_tensorflow(tmp_path, without_tensorflow):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator as events  # noqa
  writer = summary.create_writer(str(tmp_path))
  writer.write_hparams({"batch_size": 8})
  writer.write_scalars(3, {"train/loss": 1.5})
  writer.write_images(3, {"eval/map": np.full((1, 4, 5, 3), 200, np.uint8)})
  writer.write_scalars(7, {"train/loss": 0.25})
  writer.close()
  acc = events.EventAccumulator(str(tmp_path), size_guidance={"images": 0})
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(3, 1.5), (7, 0.25)]
  image = acc.Images("eval/map")[0]
  assert (image.step, image.width, image.height) == (3, 5, 4)
  assert "tensorflow" not in sys.modules


def test_orbax_notices_are_dropped_unless_verbose():
  def record(path, level):
    return logging.LogRecord("absl", level, path, 1, "Given directory is read only", None, None)
  keep = cli._NoOrbaxNotices().filter  # pylint: disable=protected-access
  orbax = os.path.join("site-packages", "orbax", "checkpoint", "checkpoint_manager.py")
  assert not keep(record(orbax, logging.WARNING))
  assert keep(record(orbax, logging.ERROR))
  assert keep(record(os.path.join("jaxembed", "data", "folder.py"), logging.WARNING))
  assert cli.verbose(["--verbosity=1"]) and not cli.verbose(["--verbosity=0"])


def test_readme_commands_use_the_tool_and_ci_runs_the_test_command():
  with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  run_job, run_tests = [b for b in readme.split("```bash\n")[1:3]]
  assert "pip install . && jaxembed train --config digits --workdir runs/digits" in run_job
  test_command = run_tests.split("\n")[0].split(". .venv/bin/activate && ")[1]
  with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
    assert test_command in f.read().splitlines()
  table = readme.split("## The `jaxembed` command")[1].split("\n## ")[0]
  assert all(f"| `jaxembed {name}" in table for name in FLAGS)
