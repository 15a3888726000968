"""The comparison scripts against the PyTorch reference: their command lines, without torch.

Torch and tsimcne are never installed with jaxembed, so these checks need
neither: each script answers --help, and refuses, with exit status 2 and a
message naming what is missing, an interpreter given as --torch_python that
lacks them (this test's own Python, which has no torch) or that does not
exist. The comparisons themselves run by hand (docs/BENCHMARKS.md).
"""

import importlib.util
import os
import subprocess
import sys

import pytest

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
NAMES = ["compare_reference.py", "benchmark_reference_step.py", "benchmark_augment.py"]

no_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is not None,
                              reason="this interpreter has torch; the refusal needs one without")


def run_script(name, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(SCRIPTS, name), *args],
                        capture_output=True, text=True, timeout=120, env=env, check=False)


@pytest.mark.parametrize("name", NAMES)
def test_help(name):
  proc = run_script(name, "--help")
  assert proc.returncode == 0, proc.stderr
  assert "--torch_python" in proc.stdout


@no_torch
@pytest.mark.parametrize("name", NAMES)
def test_interpreter_without_torch_exits_2(name, tmp_path):
  out = tmp_path / "result.json"
  proc = run_script(name, "--torch_python", sys.executable, "--out", str(out))
  assert proc.returncode == 2, (proc.stdout, proc.stderr)
  err = proc.stderr.strip().splitlines()[-1]
  assert err.startswith("error: not importable in ")
  assert "torch (ModuleNotFoundError" in err
  assert "--torch_python" in err
  assert not out.exists()  # nothing ran, nothing was written


@pytest.mark.parametrize("name", NAMES)
def test_missing_interpreter_exits_2(name, tmp_path):
  missing = str(tmp_path / "no" / "python")
  proc = run_script(name, "--torch_python", missing, "--out", str(tmp_path / "r.json"))
  assert proc.returncode == 2, (proc.stdout, proc.stderr)
  assert f"torch interpreter {missing!r} does not exist" in proc.stderr


@no_torch
def test_step_benchmark_needs_torch_by_default(tmp_path):
  # Without --torch_python the current interpreter is tried; the step
  # benchmark has nothing to run without the reference.
  proc = run_script("benchmark_reference_step.py", "--out", str(tmp_path / "r.json"))
  assert proc.returncode == 2, (proc.stdout, proc.stderr)
  assert "not importable" in proc.stderr and "tsimcne" in proc.stderr


def test_check_reports_only_missing_packages():
  # json and os are importable everywhere; a made-up name is not.
  proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, "torch_side.py"), "check",
                         "--need", "json,os,not_a_module_xyz"],
                        capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 2
  assert "not_a_module_xyz (ModuleNotFoundError" in proc.stderr
  assert "json" not in proc.stderr.split("not importable in")[1].split(". Pass")[0]
  proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, "torch_side.py"), "check",
                         "--need", "json"], capture_output=True, text=True, timeout=60,
                        check=False)
  assert proc.returncode == 0 and proc.stdout.startswith("RESULT {\"json\": ")


def test_compare_rejects_stray_arguments():
  proc = run_script("compare_reference.py", "--epochz", "1,1,1")
  assert proc.returncode == 2
  assert "--config.FIELD=VALUE" in proc.stderr
