"""The t-SimCNE model: input normalisation, a backbone, and the MLP projector on top.

Reference (Böhm, Berens, Kobak, ICLR 2023): ResNet-18 features (512) ->
Linear(512, 1024) -> ReLU -> Linear(1024, 128) in stage 1; stages 2 and 3 replace the last
Linear by Linear(1024, 2). Here the head dimension is an attribute: the trainer re-creates the
model with ``head_dim=2`` and swaps ``params["projector"]["out"]``.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp


class Projector(nn.Module):
  """Dense(hidden_dim) -> ReLU -> Dense(head_dim); returns (hidden after ReLU, output).

  Computed in float32 whatever the backbone's dtype: it is cheap, and the 2-D output feeds a
  Cauchy kernel whose distances should not be rounded to bf16.
  """
  hidden_dim: int = 1024
  head_dim: int = 128

  @nn.compact
  def __call__(self, features):
    features = features.astype(jnp.float32)
    hidden = nn.relu(nn.Dense(self.hidden_dim, name="hidden")(features))
    z = nn.Dense(self.head_dim, name="out")(hidden)
    return hidden, z


class TSimCNEModel(nn.Module):
  """Normalise the input, extract features, project them.

  Attributes:
    backbone: a module with ``__call__(x, train) -> (B, D)`` features (see ``create_backbone``).
    hidden_dim: width of the projector's hidden layer (reference 1024).
    head_dim: output dimension (reference 128 in stage 1, 2 afterwards).
    input_mean, input_std: per-channel statistics for ``(x - mean) / std`` on [0, 1] pixels;
      None leaves the input as it is.
  """
  backbone: nn.Module
  hidden_dim: int = 1024
  head_dim: int = 128
  input_mean: Optional[Sequence[float]] = None
  input_std: Optional[Sequence[float]] = None

  def normalize(self, x):
    """``(x - input_mean) / input_std`` per channel, or ``x`` when they are None."""
    x = jnp.asarray(x, jnp.float32)
    if self.input_mean is None and self.input_std is None:
      return x
    channels = x.shape[-1]
    mean = jnp.zeros((channels,)) if self.input_mean is None else jnp.asarray(
        self.input_mean, jnp.float32)
    std = jnp.ones((channels,)) if self.input_std is None else jnp.asarray(
        self.input_std, jnp.float32)
    if mean.shape not in ((channels,), (1,)) or std.shape not in ((channels,), (1,)):
      raise ValueError(
          f"model.input_mean {self.input_mean} / input_std {self.input_std} need one value per "
          f"channel ({channels} for images of shape {x.shape}, NHWC)")
    return (x - mean) / std

  @nn.compact
  def __call__(self, x, train: bool = False):
    if x.ndim != 4:
      raise ValueError(f"expected a batch of NHWC images, got an array of shape {x.shape}")
    features = self.backbone(self.normalize(x), train=train).astype(jnp.float32)
    hidden, z = Projector(self.hidden_dim, self.head_dim, name="projector")(features)
    return {"features": features, "hidden": hidden, "z": z.astype(jnp.float32)}
