#!/usr/bin/env bash
# demo.py's recipes as one command each, side by side, one recipe per GPU with its share of the cores, each timed
# and scored as `python demo.py --recipe=R` does it (BENCHMARKS.md "The GPU demo"). Each recipe's log, report,
# metrics, test predictions, stage logs and stage-1 ViT (when small) go into OUT/logs.tgz as R_*, packed as each
# recipe ends, so a call cut short still brings back what finished. Usage, on a machine with as many GPUs as recipes:
#   bash assets/bench/gpu_recipes.sh OUT SECONDS full gpu
set -u
OUT=${1:?out dir}; BUDGET=${2:?seconds}; shift 2
# shellcheck source=assets/bench/bench_start.sh
. "$(dirname "$0")/bench_start.sh"
LOGS=$(mktemp -d)  # packed into OUT/logs.tgz by bench_start.sh's pack
END=$(( T0 + BUDGET - 10 ))  # bench_start.sh's left() counts down to it
# the recipes' worlds first, one at a time with every core: two recipes that share one (full and gpu do) would
# otherwise both write it at once; demo.py then finds each made and goes on
$PY - "$@" > "$LOGS/worlds.log" 2>&1 <<'PY'
import os, subprocess, sys
import demo
for recipe in sys.argv[1:]:
    for _, args, done in demo.demo_steps(recipe):
        if args[0] == "prepare_data.py" and not os.path.exists(done):
            subprocess.run([sys.executable, *args], check=True)
PY
stamp "worlds made"
g=0
for recipe in "$@"; do
  (  # this recipe's GPU and cores, for every process demo.py starts (bench_start.sh's take_share)
    take_share "$g" $#
    out=$($PY -c "import demo; print(demo.RECIPES['$recipe'][0])")
    timeout "$(left)" $PY demo.py --recipe="$recipe" > "$LOGS/${recipe}_demo.log" 2>&1
    stamp "$recipe: demo.py exited with $?"
    for file in report.md eval/metrics.json eval/predictions.jsonl; do
      cp "$out/$file" "$LOGS/${recipe}_$(basename "$file")" 2>/dev/null
    done
    for stage in vision_easy vision align joint; do
      cp "$out/$stage/log.jsonl" "$LOGS/${recipe}_${stage}_log.jsonl" 2>/dev/null
    done
    keep_vit "$out/vision" "${recipe}_vit"
    pack
  ) &
  g=$(( g + 1 ))
done
wait
stamp "all recipes done"; pack
