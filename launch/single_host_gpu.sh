#!/usr/bin/env bash
# One training process that drives every local GPU (JAX shards over all devices it sees; no jax.distributed).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/single_host_gpu.sh --config CONFIG --workdir DIR [options] [-- TRAIN_ARGS...]

Runs `python -m ahn_jax.train` once, from the repository root, on all local GPUs (or those named by --gpus).

Required:
  --config PATH        config file, e.g. configs/qwen3b_gdn.py
  --workdir DIR        output directory (metrics.jsonl, checkpoints/, ahn.safetensors)
Options:
  --gpus LIST          comma-separated GPU ids to use (sets CUDA_VISIBLE_DEVICES), e.g. 0,1; default: all
  --mem-fraction F     XLA_PYTHON_CLIENT_MEM_FRACTION (fraction of GPU memory JAX preallocates, e.g. 0.9)
  --peak-tflops X      per-GPU peak TFLOP/s for the MFU column (H100 bf16: 989)
  --python BIN         Python interpreter (default: python3)
  --dry-run            print the command that would run, run nothing
  -h, --help           this text
Every other argument (e.g. --config.train.steps=100) and everything after `--` is passed to the train command.
USAGE
}

die() { echo "single_host_gpu.sh: error: $*" >&2; echo "Run launch/single_host_gpu.sh --help for usage." >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"; }
shq() {
  if [[ -n "$1" && "$1" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
quote_all() { local out="" a; for a in "$@"; do out+="$(shq "$a") "; done; printf '%s' "${out% }"; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
config="" workdir="" gpus="" mem_fraction="" peak="" python="python3" dry_run=0
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --config) need_value "$@"; config="$2"; shift 2 ;;
    --workdir) need_value "$@"; workdir="$2"; shift 2 ;;
    --gpus) need_value "$@"; gpus="$2"; shift 2 ;;
    --mem-fraction) need_value "$@"; mem_fraction="$2"; shift 2 ;;
    --peak-tflops) need_value "$@"; peak="$2"; shift 2 ;;
    --python) need_value "$@"; python="$2"; shift 2 ;;
    --config=*|--workdir=*|--gpus=*|--mem-fraction=*|--peak-tflops=*|--python=*)
      key="${1%%=*}"; set -- "$key" "${1#*=}" "${@:2}"; continue ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra+=("$@"); break ;;
    *) extra+=("$1"); shift ;;
  esac
done

missing=()
[[ -n "$config" ]] || missing+=(--config)
[[ -n "$workdir" ]] || missing+=(--workdir)
[[ ${#missing[@]} -eq 0 ]] || die "missing required argument(s): ${missing[*]}"
[[ -z "$gpus" || "$gpus" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus must be comma-separated GPU ids like 0,1, got '$gpus'"

env_vars=()
[[ -z "$gpus" ]] || env_vars+=("CUDA_VISIBLE_DEVICES=$gpus")
[[ -z "$mem_fraction" ]] || env_vars+=("XLA_PYTHON_CLIENT_MEM_FRACTION=$mem_fraction")
train=("$python" -m ahn_jax.train "--config=$config" "--workdir=$workdir")
[[ -z "$peak" ]] || train+=("--peak_tflops=$peak")
train+=(${extra[@]+"${extra[@]}"})
cmd=(env ${env_vars[@]+"${env_vars[@]}"} "${train[@]}")

if [[ $dry_run -eq 1 ]]; then
  echo "cd $(shq "$repo")"
  quote_all "${cmd[@]}"; echo
  exit 0
fi
cd "$repo"
exec "${cmd[@]}"
