"""jaxembed: t-SimCNE in JAX/Flax — 2D maps and search spaces of image collections."""

import importlib.util as _importlib_util
import os as _os
import sys as _sys

from jaxembed.version import __version__  # noqa: F401


def _checkout_configs():
  """Makes the repository's configs/ the package jaxembed.configs in a checkout used uninstalled.

  An install carries configs/ as jaxembed/configs (pyproject's package-dir);
  a checkout on PYTHONPATH has it beside this package only, and
  ``from jaxembed.configs import common`` must work there too.
  """
  here = _os.path.dirname(_os.path.abspath(__file__))
  folder = _os.path.join(_os.path.dirname(here), "configs")
  if (_os.path.isdir(_os.path.join(here, "configs"))
      or not _os.path.isfile(_os.path.join(folder, "common.py"))):
    return
  spec = _importlib_util.spec_from_file_location(
      "jaxembed.configs", _os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
  module = _importlib_util.module_from_spec(spec)
  _sys.modules["jaxembed.configs"] = module
  spec.loader.exec_module(module)
  setattr(_sys.modules[__name__], "configs", module)


_checkout_configs()


def __getattr__(name):
  # The estimator pulls in the trainer, scikit-learn and the data sources (3.3 s
  # measured on the 2-core VM, where jaxembed.evaluate alone takes 0.04 s):
  # it is imported when first asked for, so `from jaxembed import evaluate`
  # stays cheap.
  if name == "TSimCNE":
    from jaxembed.api import TSimCNE  # pylint: disable=g-import-not-at-top
    return TSimCNE
  raise AttributeError(f"module 'jaxembed' has no attribute {name!r}")
