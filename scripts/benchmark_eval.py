"""Benchmark: jaxembed.evaluate against scikit-learn, side by side in one run.

For n 2D points in 10 Gaussian clusters it times
  * silhouette_score(x, labels) against sklearn.metrics.silhouette_score,
  * knn_accuracy(k=15) with a 5:1 train/test split against
    KNeighborsClassifier(15).fit(...).score(...) (KD-tree for 2D data),
and records each one's peak resident memory above the level before the call
(sampled every 2 ms from /proc/self/statm). Two JAX times are kept: the
first call, which includes compilation (users call these once per
evaluation), and later calls, with compilation cached. Later calls alternate
with scikit-learn's, --repeats times (kNN: 5 times as many), and the table
shows medians and the median of the per-pair ratios, so that load from other
jobs on a shared machine hits both sides alike. A second call reuses memory
that the first freed, so the first call's peak is kept too. scikit-learn's
silhouette is quadratic in time and is only run up to
--sklearn_silhouette_max points (one to three minutes at 60k on 2 cores).

Prints a table and writes scripts/results/benchmark_eval.json.

  python scripts/benchmark_eval.py [--sizes 10000,60000,200000] [--repeats 3]
      [--devices N]
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import threading
import time

import results_io


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="10000,60000,200000",
                      help="comma-separated numbers of points")
  parser.add_argument("--sklearn_silhouette_max", type=int, default=60000,
                      help="largest n at which sklearn's silhouette is timed")
  parser.add_argument("--metrics", default="silhouette,knn",
                      help="comma-separated subset of silhouette,knn")
  parser.add_argument("--repeats", type=int, default=3,
                      help="silhouette timings per side after the first call")
  parser.add_argument("--devices", type=int, default=0,
                      help="if > 0, the number of XLA CPU devices to create")
  parser.add_argument("--out", default=str(
      pathlib.Path(__file__).resolve().parent / "results" / "benchmark_eval.json"))
  return parser.parse_args()


ARGS = _parse()
if ARGS.devices > 0:  # Must happen before jax is imported.
  results_io.request_cpu_devices(ARGS.devices)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import datasets  # noqa: E402
from sklearn import metrics  # noqa: E402
from sklearn import neighbors  # noqa: E402

from jaxembed import evaluate  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * _PAGE


def measure(fn):
  """Runs fn(); returns (result, seconds, peak RSS increase in MiB)."""
  base = _rss()
  peak = [base]
  done = threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], _rss())
      time.sleep(0.002)

  thread = threading.Thread(target=sample, daemon=True)
  thread.start()
  start = time.perf_counter()
  result = fn()
  seconds = time.perf_counter() - start
  done.set()
  thread.join()
  peak[0] = max(peak[0], _rss())
  return result, seconds, (peak[0] - base) / 2**20


def main():
  sizes = [int(s) for s in ARGS.sizes.split(",")]
  # Start the backend first: a training process has it running already, and
  # its one-off start-up is no part of either metric's first call.
  jax.numpy.zeros(8).block_until_ready()
  rows = []
  for n in sizes:
    x, y = datasets.make_blobs(n_samples=n, n_features=2, centers=10, cluster_std=2.0,
                               random_state=0)
    x = x.astype(np.float32)
    n_test = n // 6
    train_x, train_y, test_x, test_y = x[n_test:], y[n_test:], x[:n_test], y[:n_test]

    metrics_run = ARGS.metrics.split(",")
    # Silhouette.
    if "silhouette" in metrics_run:
      first, t_first, m_first = measure(lambda: evaluate.silhouette_score(x, y))
      row = dict(n=n, metric="silhouette", jax_first_call_s=t_first,
                 jax_first_call_peak_mib=m_first, jax_value=first, note="")
      if n <= ARGS.sklearn_silhouette_max:
        row.update(_side_by_side(lambda: evaluate.silhouette_score(x, y),
                                 lambda: float(metrics.silhouette_score(x, y)), ARGS.repeats,
                                 t_first))
      else:
        _, t_ours, m_ours = measure(lambda: evaluate.silhouette_score(x, y))
        row.update(jax_s=t_ours, jax_peak_mib=m_ours, sklearn_s=None,
                   note=f"sklearn not timed above {ARGS.sklearn_silhouette_max} points")
      rows.append(row)
      _print_row(row)

    # kNN accuracy, k=15 as in the paper.
    if "knn" not in metrics_run:
      continue
    def ours_knn():
      return evaluate.knn_accuracy(train_x, train_y, test_x, test_y, k=15)

    def sk_knn():
      clf = neighbors.KNeighborsClassifier(n_neighbors=15)
      return clf.fit(train_x, train_y).score(test_x, test_y)

    first, t_first, m_first = measure(ours_knn)
    row = dict(n=n, metric="knn_accuracy", n_train=n - n_test, n_test=n_test,
               jax_first_call_s=t_first, jax_first_call_peak_mib=m_first, jax_value=first,
               note="")
    row.update(_side_by_side(ours_knn, sk_knn, 5 * ARGS.repeats, t_first))
    rows.append(row)
    _print_row(row)

  result = dict(
      benchmark="benchmark_eval",
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      command=" ".join([os.path.basename(sys.executable)] + sys.argv),
      machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(),
                   jax_backend=jax.default_backend(), jax_devices=jax.device_count(),
                   device_kind=jax.devices()[0].device_kind),
      versions=dict(jax=jax.__version__, numpy=np.__version__,
                    sklearn=__import__("sklearn").__version__),
      rows=rows)
  out = pathlib.Path(ARGS.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(f"wrote {out}")


def _side_by_side(ours, theirs, repeats, t_first):
  """Alternating timings of ours() and theirs(); medians and per-pair ratios.

  t_first is the time of our first call (with compilation), for the ratio a
  user sees who calls once.
  """
  t_ours, t_theirs, m_ours, m_theirs = [], [], [], []
  for _ in range(repeats):
    value, seconds, mib = measure(ours)
    t_ours.append(seconds)
    m_ours.append(mib)
    sk_value, seconds, mib = measure(theirs)
    t_theirs.append(seconds)
    m_theirs.append(mib)
  ratios = [b / a for a, b in zip(t_ours, t_theirs)]
  return dict(jax_s=float(np.median(t_ours)), jax_times_s=t_ours, jax_peak_mib=max(m_ours),
              sklearn_s=float(np.median(t_theirs)), sklearn_times_s=t_theirs,
              sklearn_peak_mib=max(m_theirs), sklearn_value=float(sk_value),
              speedup=float(np.median(ratios)), speedups=ratios,
              speedup_first_call=float(np.median(t_theirs)) / t_first,
              abs_diff=abs(value - sk_value))


_HEADER = False


def _print_row(row):
  global _HEADER
  if not _HEADER:
    print(f"{'n':>8} {'metric':<13} {'jax s':>8} {'1st s':>8} {'sk s':>8} {'ratio':>6} "
          f"{'1st':>6} {'ratios':>15} {'jax MiB':>8} {'1st MiB':>8} {'sk MiB':>8} "
          f"{'|diff|':>9}  note")
    _HEADER = True
  fmt = lambda v, f: "-" if v is None or v != v else format(v, f)  # noqa: E731
  spread = row.get("speedups")
  spread = f"{min(spread):.1f}-{max(spread):.1f}" if spread else "-"
  print(f"{row['n']:>8} {row['metric']:<13} {fmt(row.get('jax_s'), '8.3f'):>8} "
        f"{row['jax_first_call_s']:>8.3f} {fmt(row.get('sklearn_s'), '8.3f'):>8} "
        f"{fmt(row.get('speedup'), '6.1f'):>6} {fmt(row.get('speedup_first_call'), '6.1f'):>6} "
        f"{spread:>15} {fmt(row.get('jax_peak_mib'), '8.1f'):>8} "
        f"{fmt(row['jax_first_call_peak_mib'], '8.1f'):>8} "
        f"{fmt(row.get('sklearn_peak_mib'), '8.1f'):>8} "
        f"{fmt(row.get('abs_diff'), '9.2e'):>9}  {row['note']}", flush=True)


if __name__ == "__main__":
  main()
