#!/usr/bin/env bash
# Issue 11's multi-GPU check, on one host with >= 2 GPUs: (1) the tiny demo (configs/tiny_gdn.py) trained on 1 GPU and
# on 2 GPUs through launch/single_host_gpu.sh — same seeded data, so the logged losses must agree; (2) one distillation
# step at Qwen2.5-3B shapes (benchmarks/bench_train_step.py, static windows) on 1 GPU and sharded fsdp=2 over 2 GPUs,
# batch 2 x SEQ: same losses, tokens/s per GPU. Writes everything under $OUT (default ./out_2gpu) and prints a summary.
#   bash benchmarks/run_2gpu.sh [SEQ] [TINY_STEPS]
set -euo pipefail
seq="${1:-8192}"
steps="${2:-100}"
out="${OUT:-./out_2gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
tmp="$(mktemp -d)"
for g in 0 0,1; do
  n=$(( ${#g} / 2 + 1 ))
  launch/single_host_gpu.sh --config configs/tiny_gdn.py --workdir "$tmp/tiny_${n}gpu" --gpus "$g" \
    --config.train.steps="$steps" 2>&1 | grep -v Warning | tail -12 || echo "tiny_gdn on GPUs $g FAILED"
  cp "$tmp/tiny_${n}gpu/metrics.jsonl" "$out/tiny_metrics_${n}gpu.jsonl" || true
done
OUT="$out" python3 benchmarks/bench_train_step.py --seq "$seq" --batch 2 --static-window --repeats 3 --tag 1gpu \
  2>&1 | grep -v Warning
OUT="$out" python3 benchmarks/bench_train_step.py --seq "$seq" --batch 2 --fsdp 2 --static-window --repeats 3 \
  --tag fsdp2 2>&1 | grep -v Warning
python3 - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def rows(n):
    return [json.loads(l) for l in (out / f"tiny_metrics_{n}gpu.jsonl").read_text().splitlines() if l.strip()]
a, b = rows(1), rows(2)
la = [r["loss"] for r in a if "loss" in r]; lb = [r["loss"] for r in b if "loss" in r]
tok = lambda rs: [r.get("tokens_per_s") for r in rs if r.get("tokens_per_s")]
print(f"tiny_gdn losses 1 GPU: {la}\ntiny_gdn losses 2 GPUs: {lb}")
print(f"max |diff| {max(abs(x - y) for x, y in zip(la, lb)):.3g} over {min(len(la), len(lb))} logged steps")
print(f"tiny tokens/s 1 GPU {tok(a)[-1:]}, 2 GPUs {tok(b)[-1:]}")
s1 = json.loads((out / "bench_train_step_static_1gpu.json").read_text())
s2 = json.loads((out / "bench_train_step_static_fsdp2.json").read_text())
print(f"3B step losses 1 GPU {s1['losses']}\n3B step losses fsdp=2 {s2['losses']}")
print(f"max |diff| {max(abs(x - y) for x, y in zip(s1['losses'], s2['losses'])):.3g}")
for s in (s1, s2):
    print(f"{s['devices']} GPU(s): step {s['step_ms']:.0f} ms, {s['tokens_per_s']:.0f} tokens/s, "
          f"{s['tokens_per_s_per_device']:.0f} tokens/s/GPU, MFU {s['mfu_datasheet']:.1%}, peak {s['peak_gib']:.1f} GiB/GPU")
PY
