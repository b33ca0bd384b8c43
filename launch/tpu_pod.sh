#!/usr/bin/env bash
# Launch ahn_jax training on every worker of a Cloud TPU VM pod slice: the same command runs on all hosts, and the
# TPU runtime tells each host its place in the slice (no coordinator flags needed on TPU).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/tpu_pod.sh --name TPU_NAME --zone ZONE --config CONFIG --workdir DIR [options] [-- TRAIN_ARGS...]

Runs `python -m ahn_jax.train` on every worker of a TPU VM pod slice through
`gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command "..."`.

Required:
  --name NAME          TPU VM name (as in `gcloud compute tpus tpu-vm list`)
  --zone ZONE          its zone, e.g. us-central2-b
  --config PATH        config file relative to the repo on the workers, e.g. configs/qwen3b_gdn.py
  --workdir DIR        output directory; every worker must see the same one (a gs:// bucket or a shared disk)
Options:
  --project ID         Google Cloud project (default: gcloud's configured one)
  --repo DIR           repository checkout on each worker (default: ahn_jax, relative to the ssh home)
  --python BIN         Python on the workers (default: python3)
  --install            first run `pip install -e '.[tpu]'` in the repo on every worker
  --dry-run            print the command that would run, run nothing
  -h, --help           this text
Every other argument (e.g. --config.train.steps=100, --peak_tflops=459) and everything after `--` is passed to the
train command unchanged.

Example:
  launch/tpu_pod.sh --name my-v5p-64 --zone us-east5-a --config configs/qwen3b_gdn.py \
      --workdir gs://my-bucket/runs/gdn3b --config.train.steps=2000
USAGE
}

die() { echo "tpu_pod.sh: error: $*" >&2; echo "Run launch/tpu_pod.sh --help for usage." >&2; exit 2; }

# Option values are taken from the next argument; a missing one (end of args or another option) is an error.
need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"; }

name="" zone="" config="" workdir="" project="" repo="ahn_jax" python="python3" install=0 dry_run=0
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name) need_value "$@"; name="$2"; shift 2 ;;
    --zone) need_value "$@"; zone="$2"; shift 2 ;;
    --config) need_value "$@"; config="$2"; shift 2 ;;
    --workdir) need_value "$@"; workdir="$2"; shift 2 ;;
    --project) need_value "$@"; project="$2"; shift 2 ;;
    --repo) need_value "$@"; repo="$2"; shift 2 ;;
    --python) need_value "$@"; python="$2"; shift 2 ;;
    --name=*|--zone=*|--config=*|--workdir=*|--project=*|--repo=*|--python=*)
      key="${1%%=*}"; set -- "$key" "${1#*=}" "${@:2}"; continue ;;
    --install) install=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra+=("$@"); break ;;
    *) extra+=("$1"); shift ;;
  esac
done

missing=()
[[ -n "$name" ]] || missing+=(--name)
[[ -n "$zone" ]] || missing+=(--zone)
[[ -n "$config" ]] || missing+=(--config)
[[ -n "$workdir" ]] || missing+=(--workdir)
[[ ${#missing[@]} -eq 0 ]] || die "missing required argument(s): ${missing[*]}"

# Shell-quote each argument for printing: bare when safe, else in single quotes (readable, and copy-pastable).
shq() {
  if [[ -n "$1" && "$1" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
quote_all() { local out="" a; for a in "$@"; do out+="$(shq "$a") "; done; printf '%s' "${out% }"; }

train=("$python" -m ahn_jax.train "--config=$config" "--workdir=$workdir" --distributed ${extra[@]+"${extra[@]}"})
remote="cd $(quote_all "$repo") && "
if [[ $install -eq 1 ]]; then
  remote+="$(quote_all "$python" -m pip install -q -e '.[tpu]') && "
fi
remote+="$(quote_all "${train[@]}")"

cmd=(gcloud compute tpus tpu-vm ssh "$name" --zone "$zone")
[[ -z "$project" ]] || cmd+=(--project "$project")
cmd+=(--worker=all --command "$remote")

if [[ $dry_run -eq 1 ]]; then
  quote_all "${cmd[@]}"; echo
  exit 0
fi
command -v gcloud >/dev/null || die "gcloud not found on PATH (install the Google Cloud SDK)"
exec "${cmd[@]}"
