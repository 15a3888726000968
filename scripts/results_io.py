"""What the scripts here share: writing JSON results (scripts/results/*.json), worker processes,
fake CPU devices."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def request_cpu_devices(n):
  """Asks XLA for ``n`` host (CPU) devices; must run before jax is first imported."""
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={n}")


def write_json(path, result, indent=1, verbose=True):
  """Writes ``result`` to ``path`` atomically (a stopped script leaves the old file whole)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=indent, default=str)
  os.replace(tmp, path)
  if verbose:
    print(f"wrote {path}")


def run_worker(script, spec, env, timeout):
  """Runs ``script --worker JSON(spec)`` in a fresh interpreter with ``env``.

  The worker prints its result as one line ``RESULT <json>``. Returns
  ``(result, None)``, or ``(None, error message)`` when it timed out or
  printed no result.
  """
  env = dict(env)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  cmd = [sys.executable, os.path.abspath(script), "--worker", json.dumps(spec)]
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
  except subprocess.TimeoutExpired:
    return None, f"timed out after {timeout:.0f} s"
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):]), None
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
  return None, f"exit {proc.returncode}: " + " | ".join(tail)
