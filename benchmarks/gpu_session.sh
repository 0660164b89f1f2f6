#!/usr/bin/env bash
# What to run when a GPU machine is lent (the library's `device` tool: 10 minutes per command, 30 minutes of
# device time per session, torch preinstalled, no network). Run from the repository root; results land in
# $OUT (or ./gpu_results). Each part fits one 10-minute command, every step under its own timeout:
#
#   bash benchmarks/gpu_session.sh tests    # tests/gpu + the FP8 GPU test, MTP through CUDA graphs, sleep mode
#   bash benchmarks/gpu_session.sh engine   # the engine's HBM roofline (a small model, then GLM-5's widths)
#   bash benchmarks/gpu_session.sh train    # training MFU of the ~1B preset on one GPU (target >= 45%)
#   bash benchmarks/gpu_session.sh all      # all three (one 10-minute command each: run them separately there)
#
# Then copy the JSON/logs into benchmarks/ and record them in engine.md / train.md with machine and date.
set -uo pipefail
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)" PYTHONUNBUFFERED=1
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
case "${1:-tests}" in
  tests)
    timeout 120 python -m pytest -q -m gpu tests/gpu tests/checkpoint/test_fp8_quant.py -p no:cacheprovider \
      -o addopts="" --timeout=110 2>&1 | tee "$OUT/gpu_tests.log"
    # MTP speculation at batch 1: verification through CUDA graphs against eager and against plain graph decode
    timeout 150 python benchmarks/bench_engine.py --only gpumtp --spec-tokens 3 --out "$OUT/engine_gpu.json" 2>&1 \
      | tee -a "$OUT/engine_gpu.log"
    # sleep mode: memory handed back and the cost of a colocated RL step's sleep / wake-up (16 GiB of KV cache)
    timeout 120 python benchmarks/bench_sleep.py --device cuda --kv-gib 16 --out "$OUT/sleep_gpu.json" 2>&1 \
      | tee -a "$OUT/engine_gpu.log"
    ;;
  engine)
    # a small model (launch-bound: where CUDA graphs matter) and GLM-5's widths with 8 layers and 64 experts
    # (a decode step reads ~GBs: the HBM roofline)
    timeout 150 python benchmarks/bench_engine.py --only gpu --gpu-preset glm5-small --gpu-context 1024 --gpu-compile \
      --out "$OUT/engine_gpu.json" 2>&1 | tee -a "$OUT/engine_gpu.log"
    timeout 300 python benchmarks/bench_engine.py --only gpu --gpu-preset glm5 --gpu-context 4096 \
      --gpu-override num_hidden_layers=8 n_routed_experts=64 --out "$OUT/engine_gpu.json" \
      --gpu-compile --gpu-profile "$OUT/decode_prof.txt" 2>&1 \
      | tee -a "$OUT/engine_gpu.log"
    ;;
  train)
    # eager, then torch.compile'd layers (the trainer's --compile)
    timeout 200 python benchmarks/bench_train.py --device cuda --preset glm5-1b --batch 8 --seq 4096 --steps 8 \
      --warmup 3 --ours dense sparse full --mfu --no-hf --json "$OUT/train_gpu.json" --profile "$OUT/train_prof.txt" \
      2>&1 | tee "$OUT/train_gpu.log"
    timeout 300 python benchmarks/bench_train.py --device cuda --preset glm5-1b --batch 8 --seq 4096 --steps 8 \
      --warmup 3 --ours dense full --compile --mfu --no-hf --json "$OUT/train_gpu_compiled.json" \
      --profile "$OUT/train_prof_compiled.txt" 2>&1 | tee -a "$OUT/train_gpu.log"
    ;;
  all) bash "$0" tests; bash "$0" engine; bash "$0" train ;;
  *) echo "usage: $0 tests|engine|train|all" >&2; exit 2 ;;
esac
