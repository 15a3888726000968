"""The embedded default: scikit-learn's 1,797 digits, a small ResNet, minutes on two CPU cores.

``python -m jaxembed.train --config configs/digits.py --workdir runs/digits``
``--config configs/digits.py:smoke`` runs a few seconds (tests);
``--config configs/digits.py:paper`` uses the reference schedule instead.
"""

from configs import common


def get_config(arg=None):
  c = common.get_config()
  c.data.source = "digits"
  c.data.image_size = 16            # 8x8 digits upsampled (bilinear)
  c.data.test_fraction = 0.2        # stratified, random_state=0 (DESIGN 3c)
  # Rotations confuse 6 and 9: the reference's default augmentation, not the medical one.
  c.aug.preset = "tsimcne"
  c.model.name = "resnet_tiny"
  c.model.widths = (16, 32, 64)
  c.model.stage_sizes = (1, 1, 1)
  c.model.hidden_dim = 256
  c.batch_size = 128
  c.stages.epochs = (40, 10, 60)
  c.stages.lr_scale = (1.0, 1.0, 0.5)
  c.stages.warmup_epochs = (2, 0, 2)
  c.stages.head_init = ("lecun", "pca", "keep")
  c.checkpoint.every_steps = 200
  c.logging.every_steps = 25

  def paper(cfg):
    ref = common.get_config()
    cfg.stages = ref.stages
    cfg.batch_size = ref.batch_size

  return common.apply_args(c, arg, {"smoke": common.smoke, "paper": paper})
