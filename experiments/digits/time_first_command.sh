#!/usr/bin/env bash
# The README's first command (after the install) of one commit, timed:
#   bash experiments/digits/time_first_command.sh COMMIT DIR [PYTHON] [--config.KEY=VALUE ...]
# clones this repository at COMMIT into DIR, checks that diffusion_jax is imported from the
# clone, runs `python -m diffusion_jax.main ...` (the part of the README's first command after
# `pip install`) there with PYTHON (default: this checkout's .venv/bin/python; the same
# dependencies for both commits) and prints the wall seconds and the run's metrics.json. Further
# arguments are appended to the command (a recipe's variant, e.g. --config.diffusion.mean_type=v).
# Run it alone on the machine: the time is the machine's as it was.
set -euo pipefail
commit=$1
dir=$2
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PY=${3:-$ROOT/.venv/bin/python}
shift $(( $# < 3 ? $# : 3 ))
rm -rf "$dir"
git clone -q "$ROOT" "$dir"
cd "$dir"
git checkout -q "$commit"
"$PY" -c 'import diffusion_jax, os; assert diffusion_jax.__file__.startswith(os.getcwd()), diffusion_jax.__file__'
cmd="$(awk '/^```bash$/{getline; print; exit}' README.md | sed 's/.*&& python -m/-m/') $*"
echo "commit $(git rev-parse --short HEAD): python $cmd"
start=$(date +%s.%N)
"$PY" $cmd > first.log 2>&1
end=$(date +%s.%N)
python3 -c "print('wall_s', round($end - $start, 1))"
cat runs/digits/eval/metrics.json
