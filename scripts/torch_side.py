"""The PyTorch side of the comparisons with the reference t-SimCNE package (``tsimcne``).

Run by a torch interpreter (a separate environment: torch, torchvision and
``tsimcne`` must never become dependencies of jaxembed), started as a
subprocess by scripts/compare_reference.py, benchmark_reference_step.py and
benchmark_augment.py. It imports nothing from jaxembed and uses the
reference's own classes: ``tsimcne.TSimCNE`` for fitting, its ResNet-18
(CIFAR stem), projector, ``InfoNCECauchy`` loss, SGD set-up and
``TransformedPairDataset`` + torchvision augmentation for the step, and its
``get_transforms_unnormalized`` for the augmentation benchmark.

Subcommands (results go to stdout as one line ``RESULT <json>``):

  check --need torch,torchvision,tsimcne   versions; exit 2 naming what is missing
  fit --data D.npz --out E.npz ...          TSimCNE.fit on the train split, 2-D of train and test
  step --images I.npz ...                   a worker that times training steps on request:
                                            prints ``READY <json>`` after warm-up, then answers
                                            ``run N`` with ``RESULT <json>``; ``quit`` ends it
  augment --images I.npz ...                torchvision images/s, two views per source image

The parent side (the jaxembed interpreter) finds the torch interpreter with
:func:`probe` and :func:`resolve`, which import no torch themselves.

Tested with tsimcne 0.3.12 (torch 2.14, torchvision 0.29, lightning 2.6).
tsimcne 0.4.x (0.4.20-0.4.24) cannot fit at all: ``TSimCNE.fit`` passes
``warmup=`` to ``PLtSimCNE``, which takes ``warmup_epochs``, reads an unset
``use_ffcv`` and gives its model the pair of views as a list.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time

USAGE_ERROR = 2
HERE = os.path.abspath(__file__)


# --------------------------------------------------------------- parent side


class TorchUnavailable(Exception):
  """The interpreter given for the torch side lacks torch, torchvision or tsimcne."""


def probe(python, need):
  """Versions of the ``need`` packages in ``python``; raises TorchUnavailable with the reason."""
  if not python or not os.path.exists(python):
    raise TorchUnavailable(f"torch interpreter {python!r} does not exist; pass "
                           "--torch_python PATH to a Python with torch, torchvision and tsimcne")
  try:
    proc = subprocess.run([python, HERE, "check", "--need", ",".join(need)],
                          capture_output=True, text=True, timeout=300, check=False)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise TorchUnavailable(f"cannot run {python}: {e}") from e
  result = _result_line(proc.stdout)
  if proc.returncode != 0 or result is None:
    lines = [l for l in (proc.stderr or "").strip().splitlines() if l.strip()]
    reason = lines[-1] if lines else f"{python} exited with {proc.returncode}"
    raise TorchUnavailable(reason[len("error: "):] if reason.startswith("error: ") else reason)
  return result


def resolve(torch_python, need):
  """(python, versions) for the torch side, or (None, reason) when the default cannot serve.

  An explicit ``torch_python`` that lacks a package is a usage error: the
  reason goes to stderr and the script exits 2. Without one, the current
  interpreter is tried and ``(None, reason)`` says why it cannot serve.
  """
  if torch_python:
    try:
      return torch_python, probe(torch_python, need)
    except TorchUnavailable as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(USAGE_ERROR)
  try:
    return sys.executable, probe(sys.executable, need)
  except TorchUnavailable as e:
    return None, str(e)


def start_worker(cmd, cwd=None):
  """Starts a step worker (``cmd``) and waits for its READY line; returns (process, info)."""
  proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                          cwd=cwd, bufsize=1)
  info = _read_tagged(proc, "READY")
  return proc, info


def ask_worker(proc, steps):
  """Has a started worker run ``steps`` timed steps; returns its RESULT dict."""
  proc.stdin.write(f"run {steps}\n")
  proc.stdin.flush()
  return _read_tagged(proc, "RESULT")


def stop_worker(proc):
  if proc.poll() is None:
    try:
      proc.stdin.write("quit\n")
      proc.stdin.flush()
      proc.wait(timeout=60)
    except (OSError, subprocess.TimeoutExpired):
      proc.kill()
      proc.wait()


def _read_tagged(proc, tag):
  for line in proc.stdout:
    if line.startswith(tag + " "):
      return json.loads(line[len(tag) + 1:])
  proc.wait()
  raise RuntimeError(f"worker {proc.args[:3]} ended (exit {proc.returncode}) before {tag}")


def _result_line(text):
  for line in reversed((text or "").splitlines()):
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  return None


def emit(tag, obj):
  print(f"{tag} {json.dumps(obj)}", flush=True)


# ------------------------------------------------------------------ check


def versions(need):
  """Versions of the needed packages; exits 2 with one line naming those missing."""
  out, missing = {}, []
  for name in need:
    try:
      module = __import__(name)
      out[name] = getattr(module, "__version__", "?")
    except ImportError as e:
      missing.append(f"{name} ({e.__class__.__name__}: {e})")
  if missing:
    print(f"error: not importable in {sys.executable}: {', '.join(missing)}. Pass "
          "--torch_python PATH to an interpreter with torch, torchvision and tsimcne "
          "(e.g. a venv with `pip install torch torchvision tsimcne==0.3.12`)",
          file=sys.stderr, flush=True)
    sys.exit(USAGE_ERROR)
  return out


def cmd_check(args):
  emit("RESULT", versions([n for n in args.need.split(",") if n]))


# -------------------------------------------------------------------- fit


class PilImages:
  """A torch-style dataset of (PIL RGB image, label) from uint8 (N, H, W, C) arrays.

  tsimcne expects PIL images (it infers the image size from them) and its
  ResNet takes three channels, so grey images are repeated to RGB.
  """

  def __init__(self, images, labels):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    if images.shape[-1] == 1:
      images = images.repeat(3, axis=-1)
    self.images = [Image.fromarray(x) for x in images]
    self.labels = [int(l) for l in labels]

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return self.images[i], self.labels[i]


def seed_everything(seed):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  random.seed(seed)
  np.random.seed(seed)
  torch.manual_seed(seed)


def cmd_fit(args):
  import numpy as np  # pylint: disable=g-import-not-at-top
  info = versions(["torch", "torchvision", "tsimcne"])
  import torch  # pylint: disable=g-import-not-at-top
  import tsimcne  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  seed_everything(args.seed)
  data = np.load(args.data)
  train = PilImages(data["train_images"], data["train_labels"])
  test = PilImages(data["test_images"], data["test_labels"])
  epochs = [int(e) for e in args.epochs.split(",")]
  kwargs = dict(total_epochs=epochs, batch_size=args.batch_size, num_workers=args.workers)
  if args.warmup != "auto":
    kwargs["warmup"] = [int(w) for w in args.warmup.split(",")]
  model = tsimcne.TSimCNE(**kwargs)
  # tsimcne 0.3.12 drops a trainer_kwargs argument (it stores dict.update's
  # None), so its own defaults (gradient clipping by value at 4) are extended
  # in place: no progress bars, logs or checkpoints in the timed run.
  model.trainer_kwargs.update(enable_progress_bar=False, logger=False,
                              enable_checkpointing=False, enable_model_summary=False)
  t0 = time.perf_counter()
  model.fit(train)
  fit_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  y_train = np.asarray(model.transform(train), np.float32)
  y_test = np.asarray(model.transform(test), np.float32)
  transform_s = time.perf_counter() - t0
  np.savez(args.out, train=y_train, test=y_test)
  emit("RESULT", dict(
      versions=info, fit_seconds=fit_s, transform_seconds=transform_s, epochs=epochs,
      batch_size=args.batch_size, learning_rates=[float(x) for x in model.learning_rates],
      warmup_epochs=list(model.warmup_schedules), num_workers=args.workers,
      threads=torch.get_num_threads(), backbone=model.backbone,
      image_size=list(model.image_size)))


# ------------------------------------------------------------------- step


def cmd_step(args):
  """One reference training step: two augmented views through its loader, forward, loss, update."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  info = versions(["torch", "torchvision", "tsimcne"])
  import torch  # pylint: disable=g-import-not-at-top
  from tsimcne import imagedistortions  # pylint: disable=g-import-not-at-top
  from tsimcne import tsimcne as ref  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  seed_everything(args.seed)
  data = np.load(args.images)
  images = data["images"]
  size = images.shape[1]
  dataset = imagedistortions.TransformedPairDataset(
      PilImages(images, np.zeros(len(images))),
      imagedistortions.get_transforms_unnormalized(size=size, setting="contrastive"))
  # As TSimCNE.make_dataloader builds it, with the augmentation in this process
  # (num_workers=0) so that it is timed apart from the compute.
  loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True,
                                       num_workers=args.workers, drop_last=True)
  # The reference's stage-1 module: its ResNet-18 (CIFAR stem), the MLP
  # projector to 128, InfoNCECauchy; its SGD (momentum 0.9, weight decay 5e-4,
  # lr 0.03 * B / 256) and cosine schedule from configure_optimizers.
  pl = ref.PLtSimCNE(backbone="resnet18_simclr", projection_head="mlp", n_epochs=1000,
                     batch_size=args.batch, pretrain_out_dim=128)
  model, loss_fn = pl.model, pl.loss
  opt = pl.configure_optimizers()["optimizer"]
  for g in opt.param_groups:  # the warm-up starts at lr 0; time a step at the peak lr
    g["lr"] = pl.lr
  model.train()
  batches = iter(loader)

  def one_step():
    nonlocal batches
    t0 = time.perf_counter()
    try:
      (x1, x2), _ = next(batches)
    except StopIteration:
      batches = iter(loader)
      (x1, x2), _ = next(batches)
    t1 = time.perf_counter()
    samples = torch.vstack((x1, x2))
    features, _ = model(samples)
    loss = loss_fn(features)
    opt.zero_grad()
    loss.backward()
    # Lightning's gradient_clip_val=4, gradient_clip_algorithm="value" (the package default).
    torch.nn.utils.clip_grad_value_(model.parameters(), 4.0)
    opt.step()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, loss.item()

  warm = [one_step() for _ in range(args.warmup)]
  emit("READY", dict(versions=info, threads=torch.get_num_threads(), image_size=size,
                     batch=args.batch, channels=3, warmup_seconds=[a + c for a, c, _ in warm],
                     parameters=sum(p.numel() for p in model.parameters())))
  for line in sys.stdin:
    parts = line.split()
    if not parts or parts[0] == "quit":
      break
    times = [one_step() for _ in range(int(parts[1]))]
    emit("RESULT", dict(augment=[t[0] for t in times], compute=[t[1] for t in times],
                        total=[t[0] + t[1] for t in times], loss=[t[2] for t in times]))


# ---------------------------------------------------------------- augment


def reference_transform(size):
  """The reference's training augmentation for ``size`` px (tsimcne's own, else the same ops)."""
  try:
    from tsimcne import imagedistortions  # pylint: disable=g-import-not-at-top
    return (imagedistortions.get_transforms_unnormalized(size=size, setting="contrastive"),
            "tsimcne.imagedistortions.get_transforms_unnormalized")
  except ImportError:
    from torchvision import transforms  # pylint: disable=g-import-not-at-top
    # The same Compose as tsimcne's "contrastive" setting (Böhm et al. 2023).
    return transforms.Compose([
        transforms.RandomResizedCrop(size=size, scale=(0.2, 1.0)),
        transforms.RandomHorizontalFlip(),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.ToTensor(),
    ]), "torchvision.transforms.Compose as in tsimcne (tsimcne not importable)"


class _Cycled:
  """``n`` pairs of views of PIL images, cycling through them (DataLoader throughput)."""

  def __init__(self, pils, transform, n):
    self.pils, self.transform, self.n = pils, transform, n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    img = self.pils[i % len(self.pils)]
    return self.transform(img), self.transform(img)


def cmd_augment(args):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  info = versions(["torch", "torchvision"])
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  seed_everything(args.seed)
  data = np.load(args.images)
  rows = {}
  for key in sorted(data.files, key=lambda k: int(k[1:])):
    images = data[key]
    size = images.shape[1]
    transform, source = reference_transform(size)
    pils = [Image.fromarray(x) for x in images]
    # One process, one image at a time: what one DataLoader worker does.
    transform(pils[0])
    n, t0 = 0, time.perf_counter()
    while n < len(pils) and (n < 8 or time.perf_counter() - t0 < args.seconds):
      transform(pils[n])
      transform(pils[n])
      n += 1
    single = n / (time.perf_counter() - t0)
    row = dict(size=size, single_process=dict(images_per_s=single, images_timed=n))
    if args.workers > 0:
      # The loader the reference trains with (TransformedPairDataset-style pairs,
      # batches collated to tensors) with one worker per core; the clock
      # starts at the first batch, so worker start-up is not counted.
      bs = 64
      total = int(max(4 * bs, single * args.workers * args.seconds)) // bs * bs + bs
      loader = torch.utils.data.DataLoader(_Cycled(pils, transform, total), batch_size=bs,
                                           num_workers=args.workers)
      it = iter(loader)
      next(it)
      t0, m = time.perf_counter(), 0
      for x1, _ in it:
        m += len(x1)
      row["dataloader"] = dict(images_per_s=m / (time.perf_counter() - t0), images_timed=m,
                               num_workers=args.workers, batch_size=bs)
    rows[str(size)] = row
  emit("RESULT", dict(versions=info, transform=source, threads=torch.get_num_threads(),
                      rows=rows))


# ------------------------------------------------------------------- main


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("check", help="versions of the needed packages; exit 2 if one is missing")
  p.add_argument("--need", default="torch,torchvision,tsimcne")
  p = sub.add_parser("fit", help="tsimcne.TSimCNE on a train/test .npz")
  p.add_argument("--data", required=True, help=".npz with train_/test_ images and labels")
  p.add_argument("--out", required=True, help=".npz to write (train, test 2-D points)")
  p.add_argument("--epochs", required=True, help="epochs per stage, e.g. 20,30,90")
  p.add_argument("--batch_size", type=int, required=True)
  p.add_argument("--warmup", default="auto", help="warm-up epochs per stage, or auto ([10,0,10])")
  p.add_argument("--workers", type=int, default=os.cpu_count())
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--seed", type=int, default=0)
  p = sub.add_parser("step", help="timed training steps of the reference (stdin protocol)")
  p.add_argument("--images", required=True, help=".npz with uint8 images (N, H, W, C)")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--workers", type=int, default=0)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  p = sub.add_parser("augment", help="torchvision augmentation throughput")
  p.add_argument("--images", required=True, help=".npz with one uint8 batch per size, 's<size>'")
  p.add_argument("--seconds", type=float, default=3.0)
  p.add_argument("--workers", type=int, default=os.cpu_count())
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  {"check": cmd_check, "fit": cmd_fit, "step": cmd_step, "augment": cmd_augment}[
      args.command](args)


if __name__ == "__main__":
  main()
