#!/usr/bin/env bash
# The "Done when" runs of the sweeps-and-analyses issue, on the demo's recipe (mnist5k, small CNN
# width 16, 8 attack epochs, D3/FT with batch 32 and their 100 epochs). Hours on a 2-core CPU.
#   1. a λ × ε grid of 30 D3 configurations (× GRID_SEEDS seeds, default 1: the grid of 90 runs
#      takes about 2 h here under load) as one command, then the same runs one by one;
#   2. every analysis PNG for the demo's BadNets and Blended models, from the CLI;
#   3. the test-free choice of λ and ε against the grid's best in hindsight.
# Results go to experiments/results/ (PNG copies included); look at each PNG.
set -euo pipefail
D3JAX=${D3JAX:-.venv/bin/d3jax}
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs/issue10}
RESULTS=experiments/results
ATTACK_FLAGS=(--dataset mnist5k --model small_cnn --model-options width 16 --epochs 8
              --learning-rate 0.05 --cosine-t-max 8 --eval-every 0 --quiet)
mkdir -p "$RUNS" "$RESULTS/analyses"

for attack in badnets blended; do
  [ -d "$RUNS/$attack" ] || $D3JAX attack --out "$RUNS/$attack" --attack "$attack" "${ATTACK_FLAGS[@]}"
  for defense in ft d3; do
    [ -d "$RUNS/$attack-$defense" ] || $D3JAX defend --attack-run "$RUNS/$attack" \
        --out "$RUNS/$attack-$defense" --eval-every 10 "$defense" --batch-size 32 --quiet
  done
  $D3JAX analyze "$RUNS/$attack" --defended "$RUNS/$attack-ft" "$RUNS/$attack-d3" \
      --out "$RESULTS/analyses/$attack" --quiet
done

$D3JAX sweep --attack-run "$RUNS/badnets" --out "$RUNS/badnets-d3-grid" --overwrite \
    --grid lmd=1,10,20,30,40 eps=0,0.1,0.2,0.3,0.4,0.5 --seeds "${GRID_SEEDS:-1}" d3 --batch-size 32 \
    | tee "$RESULTS/sweep_grid_table.txt"
cp "$RUNS/badnets-d3-grid/heatmap.png" "$RESULTS/sweep_grid_heatmap.png"
cp "$RUNS/badnets-d3-grid/results.csv" "$RESULTS/sweep_grid.csv"
$PY benchmarks/one_by_one.py --attack-run "$RUNS/badnets" --sweep-run "$RUNS/badnets-d3-grid" \
    --out "$RESULTS/sweep_grid.md"

$PY experiments/auto/auto_choice.py --out "$RESULTS/auto_choice.md" --quiet
