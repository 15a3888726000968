"""Fashion-MNIST (Xiao et al. 2017): 70,000 28x28 gray clothing images in 10 classes.

``apt-get install dataset-fashion-mnist`` puts the IDX files in
/usr/share/datasets/fashion-mnist (the default here); elsewhere pass the
folder holding ``train-images-idx3-ubyte[.gz]`` and friends with
``--config.data.path=DIR``. Train is the 60,000 training images, test the
10,000 test images. ``:smoke`` runs a few seconds; ``:cpu`` takes the small
ResNet and short schedule of the default job (configs/digits.py) with stages
of fixed lengths in steps: minutes on two CPU cores, whatever
``data.max_examples``.

Recipe: the reference's (t-SimCNE paper) ResNet-18 with the CIFAR stem, its
default augmentation and the paper schedule of configs/common.py.
"""

from jaxembed.configs import common
from jaxembed.configs import digits

DEFAULT_PATH = "/usr/share/datasets/fashion-mnist"


def get_config(arg=None):
  c = common.get_config()
  c.data.source = "idx"
  c.data.name = "fashion_mnist"
  c.data.path = DEFAULT_PATH
  c.data.image_size = 28
  c.data.channels = 1
  c.model.name = "resnet18"
  c.model.stem = "cifar"
  # Garments are upright: no rotations, the reference's default augmentation.
  c.aug.preset = "tsimcne"
  def cpu(cfg):
    common.cpu(cfg, digits.get_config(), common.CPU_STEPS)

  return common.apply_args(c, arg, {"smoke": common.smoke, "cpu": cpu})
