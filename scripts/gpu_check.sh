#!/usr/bin/env bash
# The CUDA paths once, on a machine with a GPU and gato-like installed (docs/results.md, "On one
# GPU"): 10 training steps each on one device (bf16-mixed where the GPU has it), with DDP and with
# FSDP, then the `cpu` recipe for MINUTES with LOADERS loader processes. Prints one line per check
# and leaves each run's log under OUT; score the recipe's run with
# `gato-like eval --ckpt OUT/recipe/checkpoint --episodes 10` (on any machine with the simulators).
#
#   scripts/gpu_check.sh DATA [OUT] [MINUTES] [LOADERS]
#
# DATA: a dataset folder (e.g. the one docs/training.md's suite command makes). GATO_LIKE: the
# command to run (default: gato-like).
set -u
DATA=${1:?usage: scripts/gpu_check.sh DATA [OUT] [MINUTES] [LOADERS]}
OUT=${2:-runs/gpu-check}
MINUTES=${3:-3}
LOADERS=${4:-8}
read -r -a G <<<"${GATO_LIKE:-gato-like}"
mkdir -p "$OUT"
status=0
for strategy in auto ddp fsdp; do
  log="$OUT/$strategy.log"
  "${G[@]}" train --data "$DATA" --out "$OUT/$strategy" --max_steps 10 --val_every 100000 \
    --rollout_episodes 0 --strategy "$strategy" --devices 1 >"$log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || status=1
  echo "strategy $strategy: exit $rc; $(grep -m1 -o 'Using [a-z0-9]* Automatic Mixed Precision' "$log")" \
    "$(grep '\[train\] step' "$log" | tail -1)$(grep -m1 -E 'Error|Exception|error:' "$log" | cut -c1-300)"
done
"${G[@]}" train --recipe cpu --data "$DATA" --out "$OUT/recipe" --max_minutes "$MINUTES" \
  --max_steps 10000000 --val_every 100000000 --rollout_episodes 0 --workers "$LOADERS" \
  >"$OUT/recipe.log" 2>&1 || status=1
echo "the cpu recipe, $MINUTES minutes: $(grep '\[train\] step' "$OUT/recipe.log" | tail -1)"
exit $status
