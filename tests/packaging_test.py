"""The wheel: configs inside as jaxembed.configs, no top-level ``configs``, TensorFlow an extra."""

import email.parser
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "jaxembed", "configs"]


def _setuptools_version():
  try:
    return tuple(int(p) for p in importlib.metadata.version("setuptools").split(".")[:2])
  except (importlib.metadata.PackageNotFoundError, ValueError):
    return (0, 0)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  if _setuptools_version() < (77, 0):
    pytest.skip("building the wheel offline needs setuptools>=77 (the test extra installs it)")
  src = tmp_path_factory.mktemp("src")
  for name in SOURCES:  # a copy: the build leaves build/ and *.egg-info behind
    path = os.path.join(REPO, name)
    if os.path.isdir(path):
      shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
      shutil.copy(path, src / name)
  out = tmp_path_factory.mktemp("wheel")
  # No build isolation: setuptools comes from this environment, nothing is downloaded.
  proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                         "--no-index", "-w", str(out), str(src)],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  (path,) = out.glob("jaxembed-*.whl")
  with zipfile.ZipFile(path) as z:
    yield {name: z.read(name) for name in z.namelist()}


def test_the_configs_are_inside_the_package_and_nothing_else_is_top_level(wheel):
  shipped = sorted(f for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py"))
  inside = sorted(n.split("/")[-1] for n in wheel if n.startswith("jaxembed/configs/"))
  assert inside == shipped
  top = {n.split("/")[0] for n in wheel}
  assert {t for t in top if not t.endswith(".dist-info")} == {"jaxembed"}, top


def test_every_subpackage_is_in_the_wheel(wheel):
  for root, _, files in os.walk(os.path.join(REPO, "jaxembed")):
    if "__init__.py" in files:
      rel = os.path.relpath(os.path.join(root, "__init__.py"), REPO).replace(os.sep, "/")
      assert rel in wheel, f"{rel} is missing from the wheel: add its package to pyproject.toml"


def test_console_script_and_tensorflow_only_as_an_extra(wheel):
  dist_info = next(n.split("/")[0] for n in wheel if n.endswith(".dist-info/METADATA"))
  entry_points = wheel[f"{dist_info}/entry_points.txt"].decode()
  assert "jaxembed = jaxembed.main:main" in entry_points
  meta = email.parser.Parser().parsestr(wheel[f"{dist_info}/METADATA"].decode())
  requires = meta.get_all("Requires-Dist")
  tf = [r for r in requires
        if r.split(";")[0].strip().startswith(("tensorflow-cpu", "tensorflow>"))]
  assert tf and all('extra == "tf"' in r for r in tf), tf
  assert any(r.startswith("tensorflow-datasets") and "extra" not in r for r in requires)
  assert any(r.startswith("clu") and "extra" not in r for r in requires)
  assert set(meta.get_all("Provides-Extra")) >= {"tf", "tfds", "test"}
