"""Pictures of an embedding: a scatter PNG and a self-contained interactive HTML page."""

import base64
import io
import json

import numpy as np
from PIL import Image

from jaxembed import files


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
  """Writes :func:`scatter_image` to ``path`` (atomically); returns the PNG bytes."""
  png = scatter_image(xy, labels, title, images, num_thumbnails, seed)
  files.write_bytes(path, png)
  return png


def scatter_image(xy, labels=None, title=None, images=None, num_thumbnails=0, seed=0):
  """Scatter plot of (N, 2) points coloured by label, with a legend; optional image thumbnails.

  Returns:
    The picture as PNG bytes.
  """
  # Deferred: importing matplotlib takes about a second (0.9-1.5 s measured on
  # the 2-core VM), which every command importing this module would pay.
  import matplotlib  # pylint: disable=g-import-not-at-top
  from matplotlib import figure, offsetbox  # pylint: disable=g-import-not-at-top
  xy = np.asarray(xy, np.float32)
  fig = figure.Figure(figsize=(7, 7), dpi=110)
  ax = fig.subplots()
  s = point_size(len(xy))
  if labels is None:
    ax.scatter(xy[:, 0], xy[:, 1], s=s, c="0.3", linewidths=0, rasterized=True)
  else:
    cats, inv = _label_colors(labels)
    cmap = matplotlib.colormaps["tab10" if len(cats) <= 10 else "tab20"]
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
  return map_figure_png(fig, ax, title)


def maps_png(path, panels, labels=None, class_names=None, title=None, ncols=4):
  """Several maps of the same points side by side, coloured alike by label; written atomically.

  Args:
    path: the PNG to write.
    panels: list of (title, (N, 2) map); every map has the same N points.
    labels: optional (N,) or (N, k) labels (one legend, in the first panel).
    class_names: optional names of the label values, for the legend.
    title: the figure's title.
    ncols: panels per row.
  Returns:
    The PNG bytes.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top  # deferred as in scatter_image
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  if not panels:
    raise ValueError("maps_png needs at least one (title, map) panel")
  ncols = min(ncols, len(panels))
  nrows = -(-len(panels) // ncols)
  fig = figure.Figure(figsize=(3.6 * ncols, 3.8 * nrows + (0.4 if title else 0)), dpi=100)
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  n = len(panels[0][1])
  s = point_size(n) / max(1.0, ncols / 2)
  cats, inv = _label_colors(labels) if labels is not None else (None, None)
  cmap = matplotlib.colormaps["tab10" if cats is None or len(cats) <= 10 else "tab20"]
  for a, (ax, (text, xy)) in enumerate(zip(axes, panels)):
    xy = np.asarray(xy, np.float32)
    if len(xy) != n:
      raise ValueError(f"panel {text!r} has {len(xy)} points, the first has {n}")
    if cats is None:
      ax.scatter(xy[:, 0], xy[:, 1], s=s, c="0.3", linewidths=0, rasterized=True)
    else:
      for i, cat in enumerate(cats):
        sel = inv == i
        name = str(cat)
        if class_names and 0 <= int(cat) < len(class_names):
          name = f"{cat} {class_names[int(cat)]}"
        ax.scatter(xy[sel, 0], xy[sel, 1], s=s, color=cmap(i % cmap.N), linewidths=0,
                   label=name, rasterized=True)
      if a == 0 and len(cats) <= 20:
        ax.legend(markerscale=max(1.0, 5.0 / np.sqrt(s)), fontsize=7, loc="best",
                  frameon=False)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(text, fontsize=9)
  for ax in axes[len(panels):]:
    ax.axis("off")
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  files.write_bytes(path, buf.getvalue())
  return buf.getvalue()


def map_figure_png(fig, ax, title=None):
  """Equal axes without ticks and an optional title; returns the figure as PNG bytes."""
  ax.set_aspect("equal", adjustable="datalim")
  ax.set_xticks([])
  ax.set_yticks([])
  if title:
    ax.set_title(title, fontsize=10)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  return buf.getvalue()


def decode_png(data):
  """PNG bytes as a uint8 (H, W, 3) array (for TensorBoard image summaries)."""
  with Image.open(io.BytesIO(data)) as img:
    return np.asarray(img.convert("RGB"))


def thumbnail_uris(images, max_side=64):
  """Each uint8 (H, W, C) image as a small PNG data URI.

  Images larger than ``max_side`` are shrunk; smaller ones keep their size
  (the page scales them up with crisp pixels), which keeps a page of tens
  of thousands of thumbnails small.
  """
  uris = []
  for img in images:
    img = np.asarray(img)
    img = img[..., 0] if img.shape[-1] == 1 else img
    pil = Image.fromarray(img)
    scale = max_side / max(pil.size)
    if scale < 1:
      pil = pil.resize((max(1, round(pil.size[0] * scale)), max(1, round(pil.size[1] * scale))),
                       Image.BILINEAR)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=True)
    uris.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
  return uris


def embedding_html(path, xy, labels=None, ids=None, split=None, images=None, title="embedding",
                   max_thumbnails=10000, seed=0, neighbours=None, class_names=None,
                   clusters=None, clusters_title="cluster"):
  """A self-contained page (works offline): pan, zoom, hover for the image, click for neighbours.

  Points are drawn on a canvas, so 60,000 and more stay fluid. Thumbnails
  are embedded for at most ``max_thumbnails`` sampled points (hovering any
  other point shows its label and id only); ``images=None`` leaves every
  image out of the page (for data that must not be shared).

  Args:
    path: the .html file to write.
    xy: (N, 2) map coordinates.
    labels: optional (N,) or (N, k) labels (colours and legend).
    ids: optional (N,) ids shown on hover; default the row index.
    split: optional (N,) split names shown on hover.
    images: optional (N, H, W, C) uint8 images for thumbnails.
    title: page title.
    max_thumbnails: thumbnails embedded at most (a random sample).
    seed: seed of that sample.
    neighbours: optional (N, k) int indices of each point's nearest
      neighbours (e.g. in backbone-feature space, from
      ``search.nearest``); clicking a point lists them. Without it, clicking
      lists the nearest points on the map.
    class_names: optional names of the label values, for the legend.
    clusters: optional (N,) int cluster of each point (-1: noise), e.g. from
      ``jaxembed cluster``'s cluster_assignments.csv; the page is then coloured
      by cluster (the legend says so) and a switch recolours it by label.
    clusters_title: what the clusters are, for the legend (e.g. "gmm cluster").
  """
  xy = np.asarray(xy, np.float32)
  n = len(xy)
  if xy.ndim != 2 or xy.shape[1] < 2:
    raise ValueError(f"xy must be an (N, 2) array, got shape {xy.shape}")
  if labels is not None:
    cats, inv = _label_colors(labels)
    label_text = files.label_strings(labels).tolist()
    names = [str(c) for c in cats]
    if class_names:
      names = [f"{c} {class_names[int(c)]}" if 0 <= int(c) < len(class_names) else str(c)
               for c in cats]
  else:
    inv, label_text, names = np.zeros(n, int), [""] * n, ["all"]
  thumbs = {}
  if images is not None:
    if len(images) != n:
      raise ValueError(f"{len(images)} images for {n} points; pass one image per point")
    rng = np.random.default_rng(seed)
    chosen = np.arange(n) if n <= max_thumbnails else np.sort(
        rng.choice(n, max_thumbnails, replace=False))
    # images[chosen], not np.asarray(images): images may be read from files on demand.
    thumbs = dict(zip(chosen.tolist(), thumbnail_uris(np.asarray(images[chosen]))))
  nb = None
  if neighbours is not None:
    nb = np.asarray(neighbours)
    if nb.ndim != 2 or len(nb) != n:
      raise ValueError(f"neighbours must be an (N, k) index array, got shape {nb.shape}")
    nb = [[int(j) for j in row if j != i][:10] for i, row in enumerate(nb)]
  cl = None
  if clusters is not None:
    clusters = np.asarray(clusters).reshape(-1)
    if len(clusters) != n or clusters.dtype.kind not in "iu":
      raise ValueError(f"clusters must be (N,) integers with N={n}, got "
                       f"{clusters.shape} {clusters.dtype}")
    ccats, cinv = np.unique(clusters, return_inverse=True)
    cl = {"c": cinv.astype(int).tolist(), "cats": ["noise" if c < 0 else str(c) for c in ccats],
          "title": str(clusters_title)}
  payload = {
      "title": str(title),
      "cl": cl,
      "x": np.round(xy[:, 0], 4).tolist(), "y": np.round(xy[:, 1], 4).tolist(),
      "c": inv.astype(int).tolist(), "cats": names,
      "label": label_text,
      "id": [str(i) for i in (ids if ids is not None else range(n))],
      "split": [str(s) for s in (split if split is not None else [""] * n)],
      "thumbs": {str(k): v for k, v in thumbs.items()},
      "hasImages": images is not None,
      "nb": nb,
  }
  page = _HTML.replace("__TITLE__", _escape(title)).replace(
      "__DATA__", json.dumps(payload, separators=(",", ":")).replace("</", "<\\/"))
  files.write_bytes(path, page.encode("utf-8"))


def _escape(text):
  return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"))


_HTML = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
 body{margin:0;font:13px sans-serif;display:flex;height:100vh;overflow:hidden}
 #plot{flex:1;position:relative} canvas{display:block;width:100%;height:100%;cursor:crosshair}
 #side{width:280px;overflow:auto;border-left:1px solid #ccc;padding:8px;box-sizing:border-box}
 #tip{position:absolute;pointer-events:none;background:#fff;border:1px solid #888;padding:4px;
      display:none;box-shadow:0 1px 4px rgba(0,0,0,.3);max-width:220px;word-break:break-all}
 #tip img{image-rendering:pixelated;width:96px;height:96px;display:block}
 #side img{image-rendering:pixelated;width:48px;height:48px;display:block}
 .nb{display:flex;gap:6px;align-items:center;margin:3px 0;cursor:pointer}
 .lg{cursor:pointer;user-select:none} .lg.off{opacity:.35}
 .sw{display:inline-block;width:10px;height:10px;margin-right:4px}
 button{font-size:12px}
</style></head><body>
<div id="plot"><canvas id="c"></canvas><div id="tip"></div></div>
<div id="side"><b id="ttl"></b><p>Drag to pan, wheel to zoom, hover for details, click a point
for its nearest neighbours; click a legend entry to hide or show its points.
<button id="reset">reset view</button></p><div id="mode"></div><b id="lgt"></b>
<div id="legend"></div><div id="nbs"></div></div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const N = D.x.length;
const PAL = ["#1f77b4","#ff7f0e","#2ca02c","#d62728","#9467bd","#8c564b","#e377c2","#7f7f7f",
  "#bcbd22","#17becf","#aec7e8","#ffbb78","#98df8a","#ff9896","#c5b0d5","#c49c94","#f7b6d2",
  "#c7c7c7","#dbdb8d","#9edae5"];
const color = i => PAL[i % PAL.length];
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));
document.getElementById("ttl").textContent = D.title;
// The colouring: by label, or by cluster where a cluster report was given (the default then).
const MODES = {label: {c: D.c, cats: D.cats, title: "label"}};
if (D.cl) MODES.cluster = D.cl;
let C = null, byCat = [], hidden = new Set();
const legend = document.getElementById("legend");
function setMode(m) {
  C = MODES[m].c; hidden = new Set();
  document.getElementById("lgt").textContent = "Coloured by " + MODES[m].title;
  // Points grouped by category: one fillStyle change per category keeps 60k points fast.
  byCat = MODES[m].cats.map(() => []);
  for (let i = 0; i < N; i++) byCat[C[i]].push(i);
  legend.innerHTML = "";
  MODES[m].cats.forEach((c, k) => { const d = document.createElement("div"); d.className = "lg";
    d.innerHTML = '<span class="sw"></span>'; d.firstChild.style.background = color(k);
    d.appendChild(document.createTextNode(c + " (" + byCat[k].length + ")"));
    d.addEventListener("click", () => { if (hidden.has(k)) hidden.delete(k); else hidden.add(k);
      d.classList.toggle("off"); request(); });
    legend.appendChild(d); });
}
if (D.cl) {
  const box = document.getElementById("mode");
  box.innerHTML = 'Colour by <select id="modesel"><option value="cluster">cluster</option>' +
    '<option value="label">label</option></select>';
  document.getElementById("modesel").addEventListener("change", e => {
    setMode(e.target.value); request(); });
}
setMode(D.cl ? "cluster" : "label");
const cv = document.getElementById("c"), ctx = cv.getContext("2d"), tip = document.getElementById("tip");
let W = 0, H = 0, scale = 1, ox = 0, oy = 0, sel = -1, hover = -1, pending = false;
function fit() {
  const r = cv.getBoundingClientRect(), dpr = window.devicePixelRatio || 1;
  W = r.width; H = r.height; cv.width = Math.round(W * dpr); cv.height = Math.round(H * dpr);
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
  for (let i = 0; i < N; i++) { if (D.x[i] < x0) x0 = D.x[i]; if (D.x[i] > x1) x1 = D.x[i];
    if (D.y[i] < y0) y0 = D.y[i]; if (D.y[i] > y1) y1 = D.y[i]; }
  if (!N) { x0 = y0 = -1; x1 = y1 = 1; }
  scale = 0.92 * Math.min(W / ((x1 - x0) || 1), H / ((y1 - y0) || 1));
  ox = W / 2 - scale * (x0 + x1) / 2; oy = H / 2 + scale * (y0 + y1) / 2;
}
const sx = i => ox + scale * D.x[i], sy = i => oy - scale * D.y[i];
const R = Math.max(1.5, Math.min(5, 300 / Math.sqrt(Math.max(N, 1))));
function draw() {
  pending = false;
  ctx.clearRect(0, 0, W, H);
  const r = R * Math.min(3, Math.max(1, Math.sqrt(scale / scale0)));
  byCat.forEach((pts, k) => { if (hidden.has(k)) return; ctx.fillStyle = color(k);
    for (const i of pts) { const x = sx(i), y = sy(i);
      if (x < -r || y < -r || x > W + r || y > H + r) continue;
      ctx.fillRect(x - r / 2, y - r / 2, r, r); } });
  for (const i of [sel, hover]) if (i >= 0) { ctx.strokeStyle = "#000"; ctx.lineWidth = 1.5;
    ctx.beginPath(); ctx.arc(sx(i), sy(i), r + 3, 0, 2 * Math.PI); ctx.stroke(); }
}
function request() { if (!pending) { pending = true; requestAnimationFrame(draw); } }
function nearestScreen(px, py, maxd) {
  let best = -1, bd = maxd * maxd;
  for (let i = 0; i < N; i++) { if (hidden.has(C[i])) continue;
    const dx = sx(i) - px, dy = sy(i) - py, d = dx * dx + dy * dy;
    if (d < bd) { bd = d; best = i; } }
  return best;
}
function mapNeighbours(i, k) {
  const d = [];
  for (let j = 0; j < N; j++) if (j !== i) { const dx = D.x[j] - D.x[i], dy = D.y[j] - D.y[i];
    d.push([dx * dx + dy * dy, j]); }
  d.sort((a, b) => a[0] - b[0]); return d.slice(0, k).map(p => p[1]);
}
function describe(i) {
  let t = "";
  if (D.thumbs[i]) t = '<img alt="" src="' + D.thumbs[i] + '">';
  else if (D.hasImages) t = "<i>(no thumbnail: not in the sample)</i>";
  return t + "<div>label " + esc(D.label[i] || "-") + (D.split[i] ? " (" + esc(D.split[i]) + ")" : "") +
         (D.cl ? "<br>" + esc(D.cl.title) + " " + esc(D.cl.cats[D.cl.c[i]]) : "") +
         "<br>id " + esc(D.id[i]) + "</div>";
}
function pos(e) { const r = cv.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; }
let drag = null;
cv.addEventListener("mousedown", e => { const [x, y] = pos(e); drag = [x, y, ox, oy, false]; });
window.addEventListener("mouseup", e => {
  if (drag && !drag[4]) { const [x, y] = pos(e); sel = nearestScreen(x, y, 10); showNeighbours(); request(); }
  drag = null; });
cv.addEventListener("mousemove", e => {
  const [x, y] = pos(e);
  if (drag) { const dx = x - drag[0], dy = y - drag[1];
    if (Math.abs(dx) + Math.abs(dy) > 3) drag[4] = true;
    ox = drag[2] + dx; oy = drag[3] + dy; tip.style.display = "none"; request(); return; }
  const h = nearestScreen(x, y, 8);
  if (h >= 0) { tip.innerHTML = describe(h); tip.style.display = "block";
    tip.style.left = Math.min(x + 12, W - 230) + "px"; tip.style.top = Math.min(y + 12, H - 150) + "px"; }
  else tip.style.display = "none";
  if (h !== hover) { hover = h; request(); }
});
cv.addEventListener("mouseleave", () => { tip.style.display = "none"; hover = -1; request(); });
cv.addEventListener("wheel", e => { e.preventDefault(); const [x, y] = pos(e);
  const f = Math.exp(-e.deltaY * 0.0015);
  ox = x - f * (x - ox); oy = y - f * (y - oy); scale *= f; request(); }, {passive: false});
function showNeighbours() {
  const box = document.getElementById("nbs");
  if (sel < 0) { box.innerHTML = ""; return; }
  const feat = D.nb && D.nb[sel];
  const list = feat ? D.nb[sel] : mapNeighbours(sel, 10);
  let html = "<h4>Selected</h4>" + describe(sel) + "<h4>Nearest " +
      (feat ? "in feature space" : "on the map") + "</h4>";
  for (const j of list) { const dx = D.x[j] - D.x[sel], dy = D.y[j] - D.y[sel];
    html += '<div class="nb" data-i="' + j + '">' + describe(j) + "<div>map d=" +
            Math.sqrt(dx * dx + dy * dy).toFixed(3) + "</div></div>"; }
  box.innerHTML = html;
  box.querySelectorAll(".nb").forEach(el => el.addEventListener("click", () => {
    sel = +el.dataset.i; showNeighbours(); request(); }));
}
document.getElementById("reset").addEventListener("click", () => { fit(); request(); });
window.addEventListener("resize", () => { fit(); request(); });
fit();
const scale0 = scale;
draw();
</script></body></html>
"""


def neighbour_strip(path, query_image, images, captions, query_caption="query"):
  """A PNG row: the query image, then its neighbours, each with a caption (written atomically)."""
  # Deferred, as in scatter_image.
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  items = [(query_image, query_caption)] + list(zip(images, captions))
  fig = figure.Figure(figsize=(1.3 * len(items), 1.7), dpi=110)
  axes = fig.subplots(1, len(items), squeeze=False)
  for ax, (img, cap) in zip(axes[0], items):
    img = np.asarray(img)
    if img.size:
      ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255,
                interpolation="nearest")
    ax.set_title(cap, fontsize=6)
    ax.set_xticks([])
    ax.set_yticks([])
  for spine in axes[0][0].spines.values():
    spine.set_edgecolor("red")
    spine.set_linewidth(2)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  files.write_bytes(path, buf.getvalue())
