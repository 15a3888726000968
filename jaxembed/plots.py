"""Pictures of an embedding: a scatter PNG and a self-contained interactive HTML page."""

import base64
import io
import json

import numpy as np


def _label_colors(labels):
  """(categories, per-point index into them) for single-label data; multi-label uses the first set bit."""
  labels = np.asarray(labels)
  if labels.ndim == 2:
    labels = np.where(labels.any(axis=1), labels.argmax(axis=1), -1)
  cats, inv = np.unique(labels, return_inverse=True)
  return cats, inv


def point_size(n):
  """Marker area that keeps both 300 and 300,000 points readable."""
  return float(np.clip(3000.0 / max(n, 1), 0.3, 30.0))


def scatter_png(path, xy, labels=None, title=None, images=None, num_thumbnails=0, seed=0):
  """Scatter plot of (N, 2) points coloured by label, with a legend; optional image thumbnails."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import offsetbox  # pylint: disable=g-import-not-at-top
  xy = np.asarray(xy, np.float32)
  fig, ax = plt.subplots(figsize=(7, 7), dpi=110)
  s = point_size(len(xy))
  if labels is None:
    ax.scatter(xy[:, 0], xy[:, 1], s=s, c="0.3", linewidths=0, rasterized=True)
  else:
    cats, inv = _label_colors(labels)
    cmap = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
    for i, cat in enumerate(cats):
      sel = inv == i
      ax.scatter(xy[sel, 0], xy[sel, 1], s=s, color=cmap(i % cmap.N), linewidths=0,
                 label=str(cat), rasterized=True)
    if len(cats) <= 30:
      ax.legend(markerscale=max(1.0, 6.0 / np.sqrt(s)), fontsize=8, loc="best", frameon=False,
                title="label")
  if images is not None and num_thumbnails > 0:
    rng = np.random.default_rng(seed)
    for i in rng.choice(len(xy), min(num_thumbnails, len(xy)), replace=False):
      img = images[i]
      img = img[..., 0] if img.shape[-1] == 1 else img
      box = offsetbox.OffsetImage(img, zoom=24.0 / max(img.shape[:2]), cmap="gray")
      ax.add_artist(offsetbox.AnnotationBbox(box, xy[i], frameon=False))
  ax.set_aspect("equal", adjustable="datalim")
  ax.set_xticks([])
  ax.set_yticks([])
  if title:
    ax.set_title(title, fontsize=10)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  plt.close(fig)
  _write_bytes(path, buf.getvalue())


def read_png(path):
  """A PNG file as a uint8 (H, W, 3) array (for TensorBoard image summaries)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as img:
    return np.asarray(img.convert("RGB"))


def _write_bytes(path, data):
  from jaxembed import workdir  # pylint: disable=g-import-not-at-top
  with workdir.atomic_open(path, "wb") as f:
    f.write(data)


def thumbnail_uris(images, max_side=48):
  """Each uint8 (H, W, C) image as a small PNG data URI."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  uris = []
  for img in images:
    img = np.asarray(img)
    img = img[..., 0] if img.shape[-1] == 1 else img
    pil = Image.fromarray(img)
    scale = max_side / max(pil.size)
    if scale > 1:
      pil = pil.resize((int(pil.size[0] * scale), int(pil.size[1] * scale)), Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    uris.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
  return uris


def embedding_html(path, xy, labels=None, ids=None, split=None, images=None, title="embedding",
                   max_thumbnails=20000, seed=0):
  """A self-contained page (works offline): pan, zoom, hover for image/label/id, click for neighbours.

  Points are drawn on a canvas, so tens of thousands stay fluid. Thumbnails
  are embedded for at most ``max_thumbnails`` sampled points; ``images=None``
  leaves every image out of the page (for data that must not be shared).
  """
  from jaxembed import workdir  # pylint: disable=g-import-not-at-top
  xy = np.asarray(xy, np.float32)
  n = len(xy)
  if labels is not None:
    cats, inv = _label_colors(labels)
    label_text = workdir.label_strings(labels).tolist()
  else:
    cats, inv, label_text = np.array(["all"]), np.zeros(n, int), [""] * n
  thumbs = {}
  if images is not None:
    rng = np.random.default_rng(seed)
    chosen = np.arange(n) if n <= max_thumbnails else np.sort(
        rng.choice(n, max_thumbnails, replace=False))
    thumbs = dict(zip(chosen.tolist(), thumbnail_uris(images[chosen])))
  payload = {
      "title": title,
      "x": np.round(xy[:, 0], 4).tolist(), "y": np.round(xy[:, 1], 4).tolist(),
      "c": inv.astype(int).tolist(), "cats": [str(c) for c in cats],
      "label": label_text,
      "id": [str(i) for i in (ids if ids is not None else range(n))],
      "split": [str(s) for s in (split if split is not None else [""] * n)],
      "thumbs": {str(k): v for k, v in thumbs.items()},
  }
  page = _HTML.replace("__TITLE__", _escape(title)).replace(
      "__DATA__", json.dumps(payload, separators=(",", ":")).replace("</", "<\\/"))
  _write_bytes(path, page.encode("utf-8"))


def _escape(text):
  return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"))


_HTML = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
 body{margin:0;font:13px sans-serif;display:flex;height:100vh;overflow:hidden}
 #plot{flex:1;position:relative} canvas{display:block;width:100%;height:100%;cursor:crosshair}
 #side{width:260px;overflow:auto;border-left:1px solid #ccc;padding:8px;box-sizing:border-box}
 #tip{position:absolute;pointer-events:none;background:#fff;border:1px solid #888;padding:4px;
      display:none;box-shadow:0 1px 4px rgba(0,0,0,.3);max-width:220px}
 #tip img,#side img{image-rendering:pixelated;width:64px;height:64px;display:block}
 .nb{display:flex;gap:6px;align-items:center;margin:3px 0}
 .sw{display:inline-block;width:10px;height:10px;margin-right:4px}
</style></head><body>
<div id="plot"><canvas id="c"></canvas><div id="tip"></div></div>
<div id="side"><b id="ttl"></b><p>Drag to pan, wheel to zoom, hover for details, click for
nearest neighbours on the map.</p><div id="legend"></div><div id="nbs"></div></div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const N = D.x.length;
const PAL = ["#1f77b4","#ff7f0e","#2ca02c","#d62728","#9467bd","#8c564b","#e377c2","#7f7f7f",
  "#bcbd22","#17becf","#aec7e8","#ffbb78","#98df8a","#ff9896","#c5b0d5","#c49c94","#f7b6d2",
  "#c7c7c7","#dbdb8d","#9edae5"];
const color = i => PAL[i % PAL.length];
document.getElementById("ttl").textContent = D.title;
const legend = document.getElementById("legend");
D.cats.forEach((c, i) => { const d = document.createElement("div");
  d.innerHTML = '<span class="sw"></span>'; d.firstChild.style.background = color(i);
  d.appendChild(document.createTextNode(c)); legend.appendChild(d); });
const cv = document.getElementById("c"), ctx = cv.getContext("2d"), tip = document.getElementById("tip");
let W = 0, H = 0, scale = 1, ox = 0, oy = 0, sel = -1, hover = -1;
function fit() {
  const r = cv.getBoundingClientRect(); W = cv.width = r.width; H = cv.height = r.height;
  let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
  for (let i = 0; i < N; i++) { x0 = Math.min(x0, D.x[i]); x1 = Math.max(x1, D.x[i]);
    y0 = Math.min(y0, D.y[i]); y1 = Math.max(y1, D.y[i]); }
  scale = 0.9 * Math.min(W / ((x1 - x0) || 1), H / ((y1 - y0) || 1));
  ox = W / 2 - scale * (x0 + x1) / 2; oy = H / 2 + scale * (y0 + y1) / 2;
}
const sx = i => ox + scale * D.x[i], sy = i => oy - scale * D.y[i];
const r = Math.max(1.2, Math.min(4, 300 / Math.sqrt(N)));
function draw() {
  ctx.clearRect(0, 0, W, H);
  for (let i = 0; i < N; i++) { ctx.fillStyle = color(D.c[i]);
    ctx.fillRect(sx(i) - r / 2, sy(i) - r / 2, r, r); }
  for (const i of [sel, hover]) if (i >= 0) { ctx.strokeStyle = "#000"; ctx.beginPath();
    ctx.arc(sx(i), sy(i), r + 3, 0, 6.3); ctx.stroke(); }
}
function nearestScreen(px, py, maxd) {
  let best = -1, bd = maxd * maxd;
  for (let i = 0; i < N; i++) { const dx = sx(i) - px, dy = sy(i) - py, d = dx * dx + dy * dy;
    if (d < bd) { bd = d; best = i; } }
  return best;
}
function neighbours(i, k) {
  const d = [];
  for (let j = 0; j < N; j++) if (j !== i) { const dx = D.x[j] - D.x[i], dy = D.y[j] - D.y[i];
    d.push([dx * dx + dy * dy, j]); }
  d.sort((a, b) => a[0] - b[0]); return d.slice(0, k);
}
function describe(i) {
  const t = D.thumbs[i] ? '<img alt="" src="' + D.thumbs[i] + '">' : "";
  const esc = s => String(s).replace(/[&<>]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;"}[c]));
  return t + "<div>label " + esc(D.label[i]) + (D.split[i] ? " (" + esc(D.split[i]) + ")" : "") +
         "<br>id " + esc(D.id[i]) + "</div>";
}
let drag = null;
cv.addEventListener("mousedown", e => { drag = [e.offsetX, e.offsetY, ox, oy, false]; });
window.addEventListener("mouseup", e => {
  if (drag && !drag[4]) { sel = nearestScreen(e.offsetX, e.offsetY, 10); showNeighbours(); draw(); }
  drag = null; });
cv.addEventListener("mousemove", e => {
  if (drag) { const dx = e.offsetX - drag[0], dy = e.offsetY - drag[1];
    if (Math.abs(dx) + Math.abs(dy) > 3) drag[4] = true;
    ox = drag[2] + dx; oy = drag[3] + dy; draw(); return; }
  hover = nearestScreen(e.offsetX, e.offsetY, 8);
  if (hover >= 0) { tip.innerHTML = describe(hover); tip.style.display = "block";
    tip.style.left = (e.offsetX + 12) + "px"; tip.style.top = (e.offsetY + 12) + "px"; }
  else tip.style.display = "none";
  draw();
});
cv.addEventListener("wheel", e => { e.preventDefault(); const f = Math.exp(-e.deltaY * 0.0015);
  ox = e.offsetX - f * (e.offsetX - ox); oy = e.offsetY - f * (e.offsetY - oy); scale *= f; draw(); },
  {passive: false});
function showNeighbours() {
  const box = document.getElementById("nbs");
  if (sel < 0) { box.innerHTML = ""; return; }
  let html = "<h4>Selected</h4>" + describe(sel) + "<h4>Nearest on the map</h4>";
  for (const [d, j] of neighbours(sel, 10))
    html += '<div class="nb">' + describe(j) + "<div>d=" + Math.sqrt(d).toFixed(3) + "</div></div>";
  box.innerHTML = html;
}
window.addEventListener("resize", () => { fit(); draw(); });
fit(); draw();
</script></body></html>
"""
