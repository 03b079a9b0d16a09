#!/usr/bin/env bash
# gpu-bench.sh -- issue 5's comparison on one GPU: the resident path against the classic loader, DP, DDP and
# DeepSpeed against bare loops on the same data, and the fastest settings (bf16, channels_last, compile).
#
#   bash scripts/gpu-bench.sh OUT_DIR                    # about 5 min on one H200
#   bash scripts/gpu-bench.sh OUT_DIR --repeat 3         # extra arguments go to hpcdist bench
#
# Writes OUT_DIR/bench.{json,md,png}; runs/<config>/ keeps each run's log and summary.
set -euo pipefail
out=${1:?usage: gpu-bench.sh OUT_DIR [hpcdist bench options]}
shift
cd "$(dirname "$0")/.."
grid=(
  floor ddp dp ddp:classic                                     # batch 256 fp32: resident vs classic vs bare
  floor-deepspeed:zero2:fp32 deepspeed:zero2:fp32              # DeepSpeed through hpcdist vs a bare engine loop
  floor-deepspeed:zero2:bf16 deepspeed:zero2:bf16
  deepspeed:zero2:fp16:classic:b32                             # the classic DeepSpeed CIFAR example's setup
  ddp:bf16:cl:b4096 ddp:bf16:cl:compile:b4096                  # the fastest settings
)
exec "${PYTHON:-python3}" -m hpc bench --samples 50000 --steps 1000 --warmup 50 --timeout-s 240 \
  --out "$out" "${grid[@]/#/--config=}" "$@"
