#!/usr/bin/env bash
# CPU-scale CIFAR-10 (the 10k subset in ../shared/data): BadNets on a width-32 small CNN, then FT
# and D3 (paper preset) on a 5% reserved set (500 images) at batch 64, with flips
# (BackdoorBench's CIFAR-10 augmentation).
# Run from the repository root:  bash experiments/table1/cifar_small_cnn.sh [RUNS_DIR]
set -euo pipefail
data=../shared/data/cifar10_10k_jpegsrc.npz
[ -f "$data" ] || { echo "skip: $data not found (see ../shared/data/README.md)"; exit 0; }
runs=${1:-runs/cifar_small_cnn}
d3jax=.venv/bin/d3jax
$d3jax attack --out "$runs/badnets" --dataset "npz:$data" --model small_cnn \
  --model-options width 32 --attack badnets --epochs 20 --cosine-t-max 20 --learning-rate 0.05 --flip
for defense in ft d3; do
  $d3jax defend --attack-run "$runs/badnets" --out "$runs/badnets-$defense" --reserved.ratio 0.05 \
    "$defense" --batch-size 64 --flip
done
