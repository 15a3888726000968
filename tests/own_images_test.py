"""A user's own images and trained classifier, end to end (issue #21).

A folder of JPEGs of mixed sizes in class subfolders and a torchvision
EfficientNet-B0 state dict that still has its classifier (the reference
fixture's backbone plus a 2-class ``classifier.1``): training from those
weights with configs/images.py, export of another folder, and search by a
file path whose first answer is the file itself.
"""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
from safetensors import numpy as st_numpy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_jpegs(folder, classes, per_class, seed):
  """Smooth colour fields of mixed sizes (24 to 80 px, some gray) in class subfolders."""
  rng = np.random.default_rng(seed)
  for c, name in enumerate(classes):
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    for i in range(per_class):
      h, w = rng.integers(24, 81, size=2)
      yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
      base = np.stack([xx, yy, 1 - xx], -1) if c == 0 else np.stack([yy, 1 - yy, xx], -1)
      img = np.clip(base * 200 + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
      pil = Image.fromarray(img)
      if i % 5 == 0:
        pil = pil.convert("L")  # gray scans among colour photographs
      pil.save(os.path.join(folder, name, f"{name}_{i:02d}.jpg"), quality=90)


def _classifier_state_dict(fixture, path, num_classes=2):
  """The fixture's EfficientNet-B0 with a trained model's classifier keys added."""
  sd = st_numpy.load_file(fixture)
  rng = np.random.default_rng(0)
  sd["classifier.1.weight"] = rng.normal(0, 0.01, (num_classes, 1280)).astype(np.float16)
  sd["classifier.1.bias"] = np.zeros((num_classes,), np.float16)
  st_numpy.save_file(sd, path)


def jaxembed(*args, cwd, timeout=900):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  code = "import sys; from jaxembed import main; sys.exit(main.main(['jaxembed'] + sys.argv[1:]))"
  return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_folder_and_classifier_to_map_export_and_search(tmp_path, shared_fixtures):
  base = str(tmp_path)
  _write_jpegs(os.path.join(base, "scans"), ("grade0", "grade1"), 16, seed=0)
  _write_jpegs(os.path.join(base, "new_scans"), ("grade0", "grade1"), 3, seed=1)
  _classifier_state_dict(os.path.join(shared_fixtures, "efficientnet_b0.safetensors"),
                         os.path.join(base, "grader.safetensors"))

  # The frozen variant: the classifier's backbone stays as trained, the projector learns
  # the map (the fast path for a user with a good model; docs/usage.md).
  r = jaxembed("train", "--config", "images:efficientnet_b0,frozen", "--workdir", "run",
               "--config.data.path=scans", "--config.model.pretrained=grader.safetensors",
               "--config.data.image_size=32", "--config.batch_size=16",
               "--config.data.test_fraction=0.25", "--config.model.hidden_dim=32",
               "--config.stages.steps=(3,2,2)", "--config.stages.warmup_steps=(0,0,0)",
               "--config.eval.batch_size=32", "--config.outputs.plots=False", cwd=base)
  assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
  out = r.stdout + r.stderr
  assert "classifier.1.weight" in out and "classifier.1.bias" in out  # dropped, said so
  metrics = json.loads(open(os.path.join(base, "run", "metrics.json")).read())
  assert np.isfinite(metrics["knn_accuracy"]) and metrics["steps"] == 7
  with np.load(os.path.join(base, "run", "embeddings.npz")) as z:
    ids = z["ids"].astype(str)
    assert z["embedding"].shape == (32, 2) and z["features"].shape[1] == 1280
  assert sorted(ids) == sorted(os.path.join("scans", g, f)
                               for g in ("grade0", "grade1")
                               for f in os.listdir(os.path.join(base, "scans", g)))

  # Another folder embedded by the trained run.
  r = jaxembed("export", "--workdir", "run", "--data", "new_scans", "--out", "new.npz",
               "--noplots", cwd=base)
  assert r.returncode == 0, r.stderr[-3000:]
  with np.load(os.path.join(base, "new.npz")) as z:
    new_ids = z["ids"].astype(str)
    assert z["embedding"].shape == (6, 2) and np.isfinite(z["embedding"]).all()
  assert all(i.startswith(os.path.join(base, "new_scans")) or i.startswith("new_scans")
             for i in new_ids), new_ids

  query = os.path.join(base, ids[3])  # an absolute spelling of a relative id
  r = jaxembed("search", "--workdir", "run", "--query", query, "--k", "4", "--out", "s.png",
               cwd=base)
  assert r.returncode == 0, r.stderr[-3000:]
  answers = [l.split() for l in r.stdout.splitlines() if l.strip()[:1].isdigit()]
  assert answers[0][:2] == ["0", "0.00000"] and answers[0][4] == ids[3]
  assert len(answers) == 5 and all(a[4] in ids for a in answers[1:])
