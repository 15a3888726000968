"""Tests of the plots: the interactive HTML page (in headless Chromium where present) and the PNG.

The browser test loads the page with a probe script added around it that
records console errors and uncaught exceptions, moves the mouse onto a
point with a thumbnail and writes what the tooltip shows into the DOM,
which ``chromium --headless --dump-dom`` prints. It is skipped where no
Chromium is installed (``apt-get install -y chromium``).
"""

import json
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
from PIL import Image

from jaxembed import plots

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1200,800"]

_PROBE_HEAD = r"""<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push("uncaught: " + e.message));
const __ce = console.error;
console.error = (...a) => { window.__errors.push(a.join(" ")); __ce(...a); };
</script>"""

_PROBE_END = r"""<script>
(function () {
  const out = {errors: window.__errors, n: N};
  const cv = document.getElementById("c"), r = cv.getBoundingClientRect();
  const keys = Object.keys(D.thumbs);
  const target = keys.length ? +keys[Math.floor(keys.length / 2)] : 0;
  const x = r.left + sx(target), y = r.top + sy(target);
  cv.dispatchEvent(new MouseEvent("mousemove", {clientX: x, clientY: y, bubbles: true}));
  const tip = document.getElementById("tip");
  out.tipShown = tip.style.display === "block";
  out.tipImg = !!tip.querySelector("img[src^='data:image/png']");
  out.tipText = tip.textContent;
  out.hoverId = D.id[hover];
  out.targetId = D.id[target];
  cv.dispatchEvent(new MouseEvent("mousedown", {clientX: x, clientY: y, bubbles: true}));
  window.dispatchEvent(new MouseEvent("mouseup", {clientX: x, clientY: y, bubbles: true}));
  out.neighbours = document.querySelectorAll("#nbs .nb").length;
  const pre = document.createElement("pre");
  pre.id = "probe-result"; pre.style.display = "none"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>"""


def chromium():
  for name in ("chromium", "chromium-browser", "google-chrome"):
    path = shutil.which(name)
    if path:
      return path
  return None


def render(page_path, screenshot=None, probe=True, timeout=90):
  """Loads the page in headless Chromium; returns (probe result dict, console lines)."""
  with open(page_path, encoding="utf-8") as f:
    html = f.read()
  if probe:
    html = html.replace("<head>", "<head>" + _PROBE_HEAD, 1).replace(
        "</body>", _PROBE_END + "</body>", 1)
  with tempfile.TemporaryDirectory() as tmp:
    probed = os.path.join(tmp, "page.html")
    with open(probed, "w", encoding="utf-8") as f:
      f.write(html)
    cmd = [chromium()] + CHROMIUM_FLAGS + [f"--user-data-dir={tmp}/profile",
                                           "--enable-logging=stderr", "--v=0"]
    if screenshot:
      cmd.append(f"--screenshot={os.path.abspath(screenshot)}")
    else:
      cmd.append("--dump-dom")
    r = subprocess.run(cmd + ["file://" + probed], capture_output=True, text=True,
                       timeout=timeout)
  console = [l for l in r.stderr.splitlines() if ":CONSOLE" in l]
  m = re.search(r'<pre id="probe-result"[^>]*>(.*?)</pre>', r.stdout, re.S)
  result = json.loads(m.group(1).replace("&amp;", "&").replace("&lt;", "<").replace(
      "&gt;", ">").replace("&quot;", '"')) if m else None
  return result, console


needs_chromium = pytest.mark.skipif(chromium() is None, reason="chromium is not installed")


def make_page(path, n, thumbnails=True, max_thumbnails=500, ids=None):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, size=n)
  xy = rng.normal(size=(n, 2)).astype(np.float32) + 6 * np.stack(
      [np.cos(labels), np.sin(labels)], 1)
  images = rng.integers(0, 256, size=(min(n, 2000), 8, 8, 1), dtype=np.uint8)
  images = images[np.arange(n) % len(images)]
  plots.embedding_html(path, xy, labels, ids if ids is not None else [f"img{i}" for i in range(n)],
                       ["train"] * n, images=images if thumbnails else None,
                       max_thumbnails=max_thumbnails, title="test <page>")
  return xy, labels


def payload(path):
  with open(path, encoding="utf-8") as f:
    html = f.read()
  m = re.search(r'<script id="data" type="application/json">(.*?)</script>', html, re.S)
  return json.loads(m.group(1)), html


def test_page_payload_and_thumbnail_sampling(tmp_path):
  path = str(tmp_path / "p.html")
  make_page(path, 3000, max_thumbnails=250, ids=[f"a</script>{i}" for i in range(3000)])
  data, html = payload(path)
  assert len(data["x"]) == 3000 and len(data["thumbs"]) == 250
  assert data["id"][5] == "a</script>5"          # escaped in the page, intact in the data
  assert "<title>test &lt;page&gt;</title>" in html
  thumb = data["thumbs"][next(iter(data["thumbs"]))]
  assert thumb.startswith("data:image/png;base64,")


def test_page_without_thumbnails_holds_no_images(tmp_path):
  path = str(tmp_path / "p.html")
  make_page(path, 200, thumbnails=False)
  data, html = payload(path)
  assert data["thumbs"] == {} and "data:image" not in html and not data["hasImages"]


@needs_chromium
def test_page_in_chromium_60k_points(tmp_path):
  path = str(tmp_path / "big.html")
  make_page(path, 60000, max_thumbnails=2000)
  result, console = render(path)
  assert result is not None, "the page did not run to the end"
  assert result["errors"] == [] and not [l for l in console if "Uncaught" in l], console
  assert result["n"] == 60000
  assert result["tipShown"] and result["tipImg"] and result["hoverId"] == result["targetId"]
  assert result["targetId"] in result["tipText"]
  assert result["neighbours"] == 10


@needs_chromium
def test_chromium_probe_catches_errors(tmp_path):
  # The probe must see a broken page: the test above cannot pass vacuously.
  path = str(tmp_path / "broken.html")
  make_page(path, 50)
  with open(path, encoding="utf-8") as f:
    html = f.read()
  with open(path, "w", encoding="utf-8") as f:
    f.write(html.replace("fit();\nconst scale0", "console.error('boom'); fit();\nconst scale0"))
  result, _ = render(path)
  assert result["errors"] == ["boom"]


def _near(img, rgb, tol=40):
  return (np.abs(img.astype(int) - np.array(rgb)).sum(axis=-1) <= tol)


def test_scatter_png_draws_each_class_where_its_points_are(tmp_path):
  rng = np.random.default_rng(0)
  xy = np.concatenate([rng.normal(size=(250, 2)) + [-8, 0], rng.normal(size=(250, 2)) + [8, 0]])
  labels = np.repeat([0, 1], 250)
  path = tmp_path / "s.png"
  png = plots.scatter_png(str(path), xy, labels, title="t")
  assert path.read_bytes() == png
  img = plots.decode_png(png)
  with Image.open(path) as pil:
    assert pil.size == (img.shape[1], img.shape[0]) and img.shape[0] > 300
  # matplotlib's tab10: class 0 blue, class 1 orange, no third class (green).
  blue, orange, green = (31, 119, 180), (255, 127, 14), (44, 160, 44)
  cols_blue = np.nonzero(_near(img, blue))[1]
  cols_orange = np.nonzero(_near(img, orange))[1]
  assert len(cols_blue) > 200 and len(cols_orange) > 200
  assert np.median(cols_blue) < img.shape[1] / 2 < np.median(cols_orange)
  assert not _near(img, green).any()
  # Thumbnails: magenta images show up only when asked for.
  images = np.zeros((500, 8, 8, 3), np.uint8)
  images[..., 0] = images[..., 2] = 255
  with_thumbs = plots.decode_png(plots.scatter_image(xy, labels, images=images,
                                                     num_thumbnails=10))
  without = plots.decode_png(plots.scatter_image(xy, labels, images=images, num_thumbnails=0))
  assert _near(with_thumbs, (255, 0, 255)).sum() > 50 and not _near(without, (255, 0, 255)).any()
  assert plots.point_size(300) > plots.point_size(60000)