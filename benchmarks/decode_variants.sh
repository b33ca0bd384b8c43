#!/usr/bin/env bash
# Decode on the GPU machine at batch 1, 128k context (hybrid W=32640 and full KV): step time, profile summary and
# Decoder.greedy (32 tokens per compiled loop) under the default XLA flags and with WHILE/CONDITIONAL added to the
# command-buffer (CUDA graph) kinds, which lets XLA capture greedy's fori_loop as one graph. (The full measurement is
# bench_decode.py's defaults; see RESULTS.md.) Each variant writes $OUT/<variant>/bench_decode.json; a variant that fails (an unknown flag
# value, a timeout) is logged and the next one runs.
#   bash benchmarks/decode_variants.sh        (PYTHONPATH=$PWD; ~5 minutes on an H100)
set -u
OUT=${OUT:-.}
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
quick=(--contexts 131072 --batches 1 --windows 32640 --prefill-length 0 --profile --no-greedy-rows)  # --profile times greedy
run() {  # run NAME SECONDS XLA_FLAGS ARGS...
  local name=$1 secs=$2 flags=$3; shift 3
  mkdir -p "$OUT/$name"
  echo "=== $name (XLA_FLAGS='$flags')"
  OUT="$OUT/$name" XLA_FLAGS="$flags" timeout "$secs" python3 benchmarks/bench_decode.py "$@" 2>&1 \
    | grep -v '^ ' | tail -25 || echo "variant $name failed or timed out"
}
run default "${QUICK_S:-150}" "" "${quick[@]}"
run cmdbuf_while "${QUICK_S:-150}" \
  "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL" "${quick[@]}"
