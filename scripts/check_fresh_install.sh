#!/usr/bin/env bash
# Issue #20's check of an install as a new user makes it: a fresh virtual environment,
# `pip install .` (not editable), then, from a directory outside the checkout: every
# --help, no top-level `configs`, no TensorFlow, the smoke job, export and cluster on its
# workdir, and no TensorFlow lines in the run's output. A few minutes; not a CI test.
#
# Usage: scripts/check_fresh_install.sh [DIR]   (DIR: where the venv and the run go; default a
# new temporary directory). Prints one line per check and exits 1 at the first that fails.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d)}
mkdir -p "$work/outside"
fail() { echo "FAIL: $*"; exit 1; }
since() { printf "%.2f" "$(echo "$(date +%s.%N) - $1" | bc)"; }  # seconds since $1

python3 -m venv "$work/venv" || fail "python3 -m venv"
t0=$(date +%s.%N)
"$work/venv/bin/pip" install -q "$repo" > "$work/install.log" 2>&1 || fail "pip install . (see $work/install.log)"
echo "pip install .: $(since $t0) s, venv $(du -sh "$work/venv" | cut -f1)," \
     "$("$work/venv/bin/pip" list 2>/dev/null | tail -n +3 | wc -l) packages, load $(cut -d' ' -f1 /proc/loadavg)"

cd "$work/outside" || fail "cd $work/outside"
jx="$work/venv/bin/jaxembed"
py="$work/venv/bin/python"
for cmd in "" train export search cluster configs; do
  t0=$(date +%s.%N)
  $jx $cmd --help > "help_$cmd.txt" 2>&1 || fail "jaxembed $cmd --help exits $?"
  echo "jaxembed $cmd --help: exit 0, $(since $t0) s, $(wc -l < "help_$cmd.txt") lines"
done
$py -c "import configs" 2> /dev/null && fail "import configs works"
echo "import configs: $($py -c 'import configs' 2>&1 | tail -1)"
$py -c "import tensorflow" 2> /dev/null && fail "TensorFlow is installed"
echo "import tensorflow: $($py -c 'import tensorflow' 2>&1 | tail -1)"

run() {  # run NAME CMD...: the command's output in NAME.log, its exit status and time printed
  local name=$1; shift
  t0=$(date +%s.%N)
  "$@" > "$name.log" 2>&1 || { tail -5 "$name.log"; fail "$* exits $?"; }
  echo "$*: exit 0, $(since $t0) s"
}
run train $jx train --config digits:smoke --workdir runs/smoke
run export $jx export --workdir runs/smoke
run cluster $jx cluster --workdir runs/smoke
for f in config.json metrics.json embeddings.npz embedding.html export/embeddings.npz \
         export/duplicates.csv clusters.json cluster_sheet.png; do
  [ -s "runs/smoke/$f" ] || fail "runs/smoke/$f is missing"
done
echo "workdir: $(ls runs/smoke | tr '\n' ' ')"
# TensorFlow's start-up lines, and any absl-formatted line (I/W/E/F, date, time).
foreign=$(grep -h -E "oneDNN|absl::InitializeLog|cpu_feature_guard|port\.cc|tensorflow|^[IWEF][0-9]{4} [0-9:.]+ " \
          train.log export.log cluster.log)
[ -z "$foreign" ] || fail "lines that are not jaxembed's in the output: $foreign"
echo "TensorFlow or absl lines in the output of train, export, cluster: none"
echo "first lines of the run:"; head -3 train.log | sed 's/^/  /'
echo "OK ($work)"
