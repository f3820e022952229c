#!/usr/bin/env bash
# The CIFAR-10 study's full budget on one lent GPU, in one device call (docs/cifar10.md):
#
#   mkdir -p .data && cp ../shared/data/cifar10* .data/ && echo /.data/ >> .git/info/exclude
#   device run: command="bash references/cifar10/gpu_study.sh .data", carry=[".data"], timeout_s=600
#
# Unpacks CIFAR-10, then trains every run of the `gpu` preset (the full budget: all 50,000 images,
# 15 epochs of batch 32; tensor cache, bf16, channels-last) side by side on the one GPU, applies the
# pilot rules at the end, prunes the chosen sparse selecsls42b exactly, runs the pruning
# head-to-head with ResNet-50 and the fair test (issue 28), and writes the report, the published
# model ($OUT/publish) and the runs' logs and metrics under $OUT.
# Uses the machine's own torch (PYTHONPATH, no install). PRESET=smoke runs every step at a toy
# size (40 training images, 1 epoch): the script tested end to end on a CPU in minutes,
#   DATA=/root/data/cifar10 PRESET=smoke bash references/cifar10/gpu_study.sh ../shared/data
set -euo pipefail
PARTS=${1:?usage: gpu_study.sh FOLDER (holding cifar10-jpeg.tar.gz.part0..3 and cifar10.sh)}
OUT=${OUT:-/tmp/gpu-study-out}
WORK=${WORK:-/tmp/gpu-study}
DATA=${DATA:-$WORK/cifar10}
PRESET=${PRESET:-gpu}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
[ -d "$DATA/train" ] || bash "$PARTS/cifar10.sh" "$DATA"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee "$OUT/machine.txt"

study() { python3 references/cifar10/run.py --data "$DATA" --out "$WORK/runs" --preset "$PRESET" --publish-to "$OUT/publish" "$@"; }
runs=$(python3 -c "import sys; sys.path.insert(0, 'references/cifar10'); import presets as p; \
print(' '.join(r.name for r in p.RUN_LISTS[p.PRESETS['$PRESET'].runs]))")
start=$(date +%s)
pids=()
for run in $runs; do  # one process per run: the GPU interleaves their small kernels
  study --runs "$run" --steps train > "$OUT/train-$run.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do  # 3: its pilot group's choice waits for the other runs (made below)
  rc=0; wait "$pid" || rc=$?
  [ "$rc" -eq 0 ] || [ "$rc" -eq 3 ] || status=1
done
echo "training: $(( $(date +%s) - start )) s, exit $status" | tee -a "$OUT/machine.txt"
study --steps train > "$OUT/choose.log" 2>&1 || status=$?  # the pilot choices, once every run has finished
study --steps prune,publish > "$OUT/prune.log" 2>&1 || status=$?
study --report "$OUT/cifar10-$PRESET.json" > "$OUT/report.md" 2>&1 || status=$?  # kept if the next step runs out of time
study --steps headtohead,fairtest > "$OUT/head-to-head.log" 2>&1 || status=$?
study --report "$OUT/cifar10-$PRESET.json" > "$OUT/report.md" 2>&1 || status=$?
for run in $runs; do
  cp "$WORK/runs/$PRESET/$run/metrics.jsonl" "$OUT/metrics-$run.jsonl" 2>/dev/null || true
done
exit $status
