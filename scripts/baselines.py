"""`jaxembed baselines` on a finished run, its baselines.json copied to scripts/results/.

  python scripts/baselines.py --workdir DIR [--name NAME] [flags of jaxembed baselines]

The JSON (scripts/results/baselines_<NAME or run folder name>.json) gets the
command line added; docs/usage.md describes the rows and the protocol.
"""

import json
import os
import sys

from jaxembed import main as jaxembed_main


def run(argv):
  name = None
  if "--name" in argv:
    at = argv.index("--name")
    name, argv = argv[at + 1], argv[:at] + argv[at + 2:]
  status = jaxembed_main.run_command("baselines", argv)
  if status:
    return status
  workdir = argv[argv.index("--workdir") + 1] if "--workdir" in argv else None
  outdir = argv[argv.index("--outdir") + 1] if "--outdir" in argv else workdir
  with open(os.path.join(outdir, "baselines.json")) as f:
    record = json.load(f)
  record["command"] = "python scripts/baselines.py " + " ".join(argv)
  name = name or os.path.basename(os.path.normpath(workdir))
  out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                     f"baselines_{name}.json")
  with open(out, "w") as f:
    json.dump(record, f, indent=2, sort_keys=True)
    f.write("\n")
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(run(sys.argv[1:]))
