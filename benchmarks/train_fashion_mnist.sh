#!/usr/bin/env bash
# selecsls42b vs ResNet-50 (selecsls.models.baselines) trained with the same recipes on Fashion-MNIST at 32x32,
# then the fraction of BatchNorm channels with |gamma| < 1e-3 after --recipe sparsity vs --recipe sgd.
#
#   bash benchmarks/train_fashion_mnist.sh                 # full: 60k train / 10k val, 3 epochs
#   EPOCHS=1 LIMIT=6000 VAL_LIMIT=2000 bash benchmarks/train_fashion_mnist.sh   # reduced
#   MODELS=selecsls42b BATCH=32 OUT=runs/fm_b32 bash benchmarks/train_fashion_mnist.sh   # one model, more steps
#
# Adam moves a parameter by at most about lr per step, so BN scales starting at 1 need more than
# 1/lr steps (1000 at the sparsity recipe's lr) to fall below 1e-3: use enough steps (smaller
# BATCH or more EPOCHS) to see the implicit sparsity.
#
# Runs are resumable: re-running continues unfinished runs (--resume) and re-prints the table.
# Images/s are only comparable between runs made on the same, otherwise idle machine.
set -euo pipefail

DATA=${DATA:-/usr/share/datasets/fashion-mnist}
OUT=${OUT:-runs/fashion_mnist}
EPOCHS=${EPOCHS:-3}
BATCH=${BATCH:-128}
WORKERS=${WORKERS:-2}
LIMIT=${LIMIT:-}
VAL_LIMIT=${VAL_LIMIT:-}
MODELS=${MODELS:-selecsls42b resnet50}
RECIPES=${RECIPES:-sparsity sgd}

# Recipes outer, models inner: the two models' runs are interleaved in time.
for recipe in $RECIPES; do
  for model in $MODELS; do
    echo "== $model, recipe $recipe"
    selecsls train --data "$DATA" --output "$OUT/$model-$recipe" --model "$model" --recipe "$recipe" \
      --img-size 32 --epochs "$EPOCHS" --batch-size "$BATCH" --workers "$WORKERS" --seed 0 --resume \
      ${LIMIT:+--limit "$LIMIT"} ${VAL_LIMIT:+--val-limit "$VAL_LIMIT"} --no-progress \
      | grep -v '^\(features\|head\|stem\|layer \)'  # keep the log short: drop the per-layer sparsity table
  done
done

# Training speed without data loading, the two models timed round-robin (robust to a busy machine).
python3 - "$BATCH" $MODELS <<'PY'
import sys
import torch
from selecsls.bench.runner import build_model, summarize, time_interleaved

batch, names = int(sys.argv[1]), sys.argv[2:]
images, targets = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
steps = {}
for name in names:
    model = build_model(name).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4)

    def step(model=model, optimizer=optimizer):
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), targets).backward()
        optimizer.step()

    steps[name] = step
medians = {name: summarize(times)["median"] for name, times in time_interleaved(steps, warmup=2, repeats=10).items()}
for name, seconds in medians.items():
    print(f"{name:<13} train step, batch {batch} at 32x32: median {seconds:.3f} s = {batch / seconds:.1f} images/s")
if {"selecsls42b", "resnet50"} <= set(medians):
    print(f"selecsls42b / resnet50 training throughput: {medians['resnet50'] / medians['selecsls42b']:.2f}x")
PY

python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path

print(f"{'model':<13}{'recipe':<10}{'val top-1':>10}{'train img/s':>13}{'val img/s':>11}{'|gamma|<1e-3':>14}")
for path in sorted(Path(sys.argv[1]).glob("*/summary.json")):
    s = json.loads(path.read_text())
    final = s["final"]
    print(f"{path.parent.name.rsplit('-', 1)[0]:<13}{s['recipe']:<10}{s['best_top1']:>9.2f}%"
          f"{final['train_images_per_s']:>13.1f}{final['val_images_per_s']:>11.1f}{100 * s['low_gamma_fraction']:>13.1f}%")
PY
