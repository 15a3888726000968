"""The medical recipe on a MedMNIST v2 dataset: 28x28, ResNet-18 (CIFAR stem), medical augmentation.

``jaxembed train --config medmnist:bloodmnist --workdir runs/blood
--config.data.path=/data/bloodmnist.npz`` (or ``--config.data.dir=/data`` holding
``bloodmnist.npz`` / ``bloodmnist_64.npz`` ...). The arg is the dataset name
followed by variants: ``breastmnist,smoke`` runs a few seconds; ``64``,
``128`` or ``224`` train at that size (the MedMNIST+ files); ``cpu`` swaps
the paper's ResNet-18 and 1500 epochs for the small ResNet and short schedule
of the default job (configs/digits.py) with stages of fixed lengths in steps
(common.CPU_STEPS), minutes on a laptop whatever the dataset's size, instead
of hours on a GPU.

Recipe (t-SimCNE on medical images; DESIGN.md section 2): 28x28 inputs, the
rotation-heavy "medical" augmentation (rot90, +-45 degree rotation filled
with the mean border colour, crops, both flips, jitter, grayscale), and the
paper's schedule from configs/common.py (1000 + 50 + 450 epochs, SGD 0.03 *
B / 256). Training uses train + val, the test split is test (DESIGN.md 3c).
"""

from jaxembed.configs import common
from jaxembed.configs import digits
from jaxembed.data import medmnist as medmnist_data

# The 2D datasets of MedMNIST v2 (Yang et al. 2023) with their channels.
DATASETS = tuple(medmnist_data.DATASETS)


def get_config(arg=None):
  parts = [a.strip() for a in (arg or "").split(",") if a.strip()]
  if not parts or parts[0] not in DATASETS:
    raise ValueError(f"the medmnist config needs a dataset name first, e.g. "
                     f"--config medmnist:breastmnist,smoke; known: {', '.join(DATASETS)}")
  name = parts[0]
  c = common.get_config()
  c.data.source = "medmnist"
  c.data.name = name
  # data.path (the .npz) or data.dir (a folder of MedMNIST files) must be given.
  c.data.image_size = 28
  c.data.channels = medmnist_data.DATASETS[name][0]
  c.model.name = "resnet18"
  c.model.stem = "cifar"            # 3x3 stride-1 stem, no max-pool (reference)
  c.aug.preset = "medical"
  # The schedule, optimiser and batch size stay at the paper's (configs/common.py).

  def size(s):
    def apply(cfg):
      cfg.data.image_size = s
    return apply

  def cpu(cfg):
    common.cpu(cfg, digits.get_config(), common.CPU_STEPS)

  variants = {"smoke": common.smoke, "cpu": cpu, "64": size(64), "128": size(128),
              "224": size(224)}
  return common.apply_args(c, ",".join(parts[1:]), variants)
