"""Writing a script's JSON result (scripts/results/*.json): one place for every script here."""

import json
import os


def write_json(path, result, indent=1, verbose=True):
  """Writes ``result`` to ``path`` atomically (a stopped script leaves the old file whole)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=indent, default=str)
  os.replace(tmp, path)
  if verbose:
    print(f"wrote {path}")
