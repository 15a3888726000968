"""jaxembed: t-SimCNE in JAX/Flax — 2D maps and search spaces of image collections."""

from jaxembed.version import __version__  # noqa: F401


def __getattr__(name):
  # The estimator pulls in the trainer, scikit-learn and the data sources (3.3 s
  # measured on the 2-core VM, where jaxembed.evaluate alone takes 0.04 s):
  # it is imported when first asked for, so `from jaxembed import evaluate`
  # stays cheap.
  if name == "TSimCNE":
    from jaxembed.api import TSimCNE  # pylint: disable=g-import-not-at-top
    return TSimCNE
  raise AttributeError(f"module 'jaxembed' has no attribute {name!r}")
