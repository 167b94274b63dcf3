#!/usr/bin/env bash
# Issue 7 benchmarks on one H100 (80 GB), offline, in at most 9 minutes of wall time.
#
#   OUT=/some/folder bash benchmarks/gpu_suite.sh      # from the repository root, `import sglang` working
#
# Writes $OUT/gpu-suite.md (one Markdown section per benchmark, each starting with the GPU, the
# device-to-device copy bandwidth and the bf16 matmul rate measured in that run), $OUT/<step>.log
# (everything each command printed) and $OUT/suite.log (exit status and seconds per step).
# Every step has its own time limit (they add up to 530 s), so one slow step cannot eat the rest;
# a step that is killed leaves its log but no Markdown section. Weights are dummy (config.json
# shapes written into $SGLANG_CACHE_DIR/bench), HF baselines are built with from_config: no download.
#
# Time per step on an H100 (2026-11-22, suite.log: one_batch 77 s, offline-8b 122 s, shared_prefix 25 s):
#   one_batch-8b     ~90 s  (limit 120): engine start + CUDA graphs ~30 s, ours ~20 s, HF bs 1/8/64 ~30 s
#   offline-8b       ~150 s (limit 160): ours 1000x1024/256 ~45-70 s + nano 256 seqs ~15-25 s, HF 64 reqs ~30 s
#   offline-qwen3    ~80 s  (limit 120): ours ~35 s both workloads, HF 64 fixed ~20 s
#   shared_prefix-8b ~50 s  (limit 70):  two engines (cache off, on), 64 requests each
#   decode_chain-8b  ~25 s  (limit 60):  weights + two CUDA graphs
set -u
: "${OUT:?set OUT to the folder for the results}"
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export SGLANG_CACHE_DIR=${SGLANG_CACHE_DIR:-/tmp/sglang-bench-cache}
mkdir -p "$OUT"
MD="$OUT/gpu-suite.md"
SUITE_START=$(date +%s)

step() {  # step NAME LIMIT_S ARGS...: run one benchmark under a time limit, log it
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s)
    echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/suite.log"
    timeout -k 10 "$limit" "$PYTHON" "$@" --out "$MD" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "== $name: rc=$rc, $(($(date +%s) - t0)) s (suite at $(($(date +%s) - SUITE_START)) s)" | tee -a "$OUT/suite.log"
    tail -n 40 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >"$OUT/suite.log" 2>&1 || true

# 1. One static batch on the 8B shape: decode ms/step vs the HBM roofline (target: batch 1 <= 1.10x),
#    prefill TFLOP/s vs the matmul rate. HF: batches up to 64, 32 new tokens per point.
step one_batch-8b 120 benchmarks/one_batch.py --device cuda --model-shape llama3-8b \
    --batch-size 1 8 64 256 --input-len 1024 --output-len 256 --hf-max-batch 64 --hf-output-len 32

# 2. Offline throughput on the 8B shape: 1,000 x 1024/256 (target: >= 80% of the printed roofline,
#    >= 20x HF) and nano-vllm's 256 sequences; HF on the first 64 fixed requests (one batch of 64),
#    none on nano (its first requests ask for ~900 tokens: ~80 s of HF steps at 8B).
step offline-8b 160 benchmarks/offline.py --device cuda --model-shape llama3-8b --workload fixed nano \
    --requests 1000 --input-len 1024 --output-len 256 --hf-requests 64 0 --hf-batch 64

# 3. The same two workloads on the Qwen3-0.6B shape; HF on 64 fixed requests (HF on nano's long
#    outputs alone ran past the limit on 2026-11-22).
step offline-qwen3-0.6b 120 benchmarks/offline.py --device cuda --model-shape qwen3-0.6b --workload fixed nano \
    --requests 1000 --input-len 1024 --output-len 256 --hf-requests 64 0 --hf-batch 64

# 4. Shared prefix on the 8B shape, radix cache off vs on (4 groups x 16 prompts, system 1024).
step shared_prefix-8b 70 benchmarks/shared_prefix.py --device cuda --model-shape llama3-8b \
    --max-running-requests 64

# 5. The batch-1 decode chain without attention (32 layers of norms + skinny matmuls in one CUDA graph),
#    PDL off vs on, against its weight-read floor.
step decode_chain-8b 60 benchmarks/decode_chain.py

echo "suite: $(($(date +%s) - SUITE_START)) s in all" | tee -a "$OUT/suite.log"
