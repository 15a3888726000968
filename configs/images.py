"""A folder of your own images (photographs, scans): ResNet-18 at 64 px, the paper's schedule.

``jaxembed train --config images --workdir runs/mine --config.data.path=DIR``,
where DIR is a folder of class subfolders (labelled: the map is scored by
them), a flat folder of images or a text file listing image paths
(unlabelled); PNG, JPEG, TIFF, BMP, GIF and WebP of any sizes, gray or
colour (jaxembed/data/folder.py). Images are resized to 64x64 and converted
to 3 channels (gray scans are repeated to RGB); 20% are held out, stratified,
to score the map (``--config.data.test_fraction=0`` trains on all).

Variants, comma-separated after the name (``images:medical,128``):
  * a backbone name: ``resnet18`` (default), ``resnet34``, ``resnet50``,
    ``efficientnet_b0`` .. ``efficientnet_b3``;
  * a number: the image size, e.g. ``128``, ``224``, or ``300``
    (EfficientNet-B3's own): ``images:efficientnet_b3,300``;
  * ``medical``: the rotation-heavy augmentation of the medical recipe
    (rot90, +-45 degrees filled with the border colour, both flips), for
    images without an upright orientation (cells, tissue, dermoscopy);
  * ``frozen``: the backbone imported with ``--config.model.pretrained=FILE``
    (docs/pretrained.md) never trains, only the projector does; ImageNet
    normalisation;
  * ``cpu``: the small ResNet at 32 px with stages of fixed lengths in steps:
    minutes on two CPU cores whatever the number of images;
  * ``smoke``: a few seconds (tests).

Recipe: ResNet-18 with torchvision's ImageNet stem (7x7 stride 2 and max-pool),
the reference's default augmentation and the paper's schedule and optimiser
(configs/common.py: 1000 + 50 + 450 epochs, SGD 0.03 * B / 256, batch 512).
"""

from jaxembed.configs import common
from jaxembed.configs import digits

# The backbones a variant can name (jaxembed.models.BACKBONES but resnet_tiny, the `cpu`
# variant's; not imported from there: it would load Flax for `jaxembed train --help`).
BACKBONES = ("resnet18", "resnet34", "resnet50", "efficientnet_b0", "efficientnet_b1",
             "efficientnet_b2", "efficientnet_b3")
# ImageNet's channel statistics, which torchvision's and timm's pretrained networks expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def get_config(arg=None):
  c = common.get_config()
  c.data.source = "folder"
  # data.path (folder, folder of class subfolders, or a file list) must be given.
  c.data.image_size = 64
  c.data.channels = 3
  c.data.test_fraction = 0.2        # stratified, random_state=0 (DESIGN 3c)
  c.model.name = "resnet18"
  # The ImageNet stem, not the reference's CIFAR stem: at 64 px the CIFAR stem
  # runs the first residual stage on 64x64 maps, 16x the convolution work of
  # the ImageNet stem's 16x16 (the whole net: ~2.3 vs ~0.15 GFLOPs per image),
  # and torchvision's and timm's pretrained ResNets have this stem, so that
  # model.pretrained imports into the default config unchanged.
  c.model.stem = "imagenet"
  c.aug.preset = "tsimcne"          # photographs are upright: no rotations
  # The schedule, optimiser and batch size stay at the paper's (configs/common.py).

  def medical(cfg):
    cfg.aug.preset = "medical"

  def frozen(cfg):
    # Stage 1 and 3 train the projector, stage 2 its new 2-d output layer;
    # the backbone's weights stay as imported in every stage (its BatchNorm
    # statistics still follow the data, as in the reference's stage 2).
    cfg.stages.trainable = ("projector", "head_out", "projector")
    cfg.model.input_mean = IMAGENET_MEAN
    cfg.model.input_std = IMAGENET_STD

  def cpu(cfg):
    common.cpu(cfg, digits.get_config(), common.CPU_STEPS)
    # 32 px: CIFAR's size, where the small ResNet's three stages end at 8x8.
    cfg.data.image_size = 32

  def backbone(name):
    def apply(cfg):
      cfg.model.name = name
    return apply

  def size(s):
    def apply(cfg):
      cfg.data.image_size = s
    return apply

  parts = [a.strip() for a in (arg or "").split(",") if a.strip()]
  variants = {"medical": medical, "frozen": frozen, "cpu": cpu, "smoke": common.smoke,
              **{name: backbone(name) for name in BACKBONES},
              **{p: size(int(p)) for p in parts if p.isdigit() and int(p) > 0}}
  return common.apply_args(c, ",".join(parts), variants)
