"""jaxembed: t-SimCNE in JAX/Flax — 2D maps and search spaces of image collections."""

__version__ = "0.1.0"


def __getattr__(name):
  # The estimator pulls in the trainer; import it only when asked for.
  if name == "TSimCNE":
    from jaxembed.api import TSimCNE  # pylint: disable=g-import-not-at-top
    return TSimCNE
  raise AttributeError(f"module 'jaxembed' has no attribute {name!r}")
