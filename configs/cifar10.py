"""CIFAR-10 with the t-SimCNE paper recipe (Böhm, Berens, Kobak, ICLR 2023).

``jaxembed train --config cifar10 --workdir runs/cifar10
--config.data.dir=~/tensorflow_datasets`` reads TFDS "cifar10" from a data_dir
prepared beforehand (``tfds build cifar10 --file_format=array_record``, read
without TensorFlow; the default TFRecord files need ``jaxembed[tf]``; nothing
is downloaded at run time). ``cifar10:smoke`` runs a few seconds.

Reference: ResNet-18 with the CIFAR stem, batch 1024, stages of
[1000, 50, 450] epochs at lr [1, 1, 1/1000] x 0.03 * B / 256, warm-up
[10, 0, 10], the default augmentation; train on "train", score on "test".
"""

from jaxembed.configs import common


def get_config(arg=None):
  c = common.get_config()
  c.data.source = "tfds"
  c.data.name = "cifar10"
  c.data.image_size = 32
  c.data.channels = 3
  c.model.name = "resnet18"
  c.model.stem = "cifar"
  c.aug.preset = "tsimcne"
  c.batch_size = 1024               # paper (the package default is 512)
  c.stages.epochs = (1000, 50, 450)
  c.stages.lr_scale = (1.0, 1.0, 0.001)
  c.stages.warmup_epochs = (10, 0, 10)
  return common.apply_args(c, arg, {"smoke": common.smoke})
