#!/usr/bin/env bash
# What to run when a GPU machine is lent (the library's `device` tool: 10 minutes per command, 30 minutes of
# device time per session, torch preinstalled, no network). Run from the repository root; results land in
# $OUT (or ./gpu_results). Each part fits one 10-minute command:
#
#   bash benchmarks/gpu_session.sh tests    # tests/gpu + the FP8 GPU test, then the engine's HBM roofline
#   bash benchmarks/gpu_session.sh train    # training MFU of the ~1B preset on one GPU (target >= 45%)
#
# Then copy the JSON/logs into benchmarks/ and record them in engine.md / train.md with machine and date.
set -uo pipefail
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)" PYTHONUNBUFFERED=1
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
case "${1:-tests}" in
  tests)
    python -m pytest -q -m gpu tests/gpu tests/checkpoint/test_fp8_quant.py -p no:cacheprovider 2>&1 \
      | tee "$OUT/gpu_tests.log"
    python benchmarks/bench_engine.py --only gpu --gpu-preset glm5-small --gpu-context 1024 \
      --out "$OUT/engine_gpu.json" 2>&1 | tee "$OUT/engine_gpu.log"
    ;;
  train)
    python benchmarks/bench_train.py --device cuda --preset glm5-1b --batch 8 --seq 4096 --steps 10 --warmup 3 \
      --ours sparse dense full --mfu --no-hf --json "$OUT/train_gpu.json" 2>&1 | tee "$OUT/train_gpu.log"
    ;;
  *) echo "usage: $0 tests|train" >&2; exit 2 ;;
esac
