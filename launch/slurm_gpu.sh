#!/usr/bin/env bash
#SBATCH --job-name=ahn_jax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
# Multi-node GPU training under SLURM. Two modes, chosen by whether we are inside a SLURM job:
#  - outside a job: submit this same script with sbatch (nodes, GPUs, one task per node or per GPU);
#  - inside a job (sbatch ran it, or you are in an salloc shell): srun one training process per task, with the
#    jax.distributed coordinator = the first host of SLURM_JOB_NODELIST, num_processes = SLURM_NTASKS and
#    process_id = each task's SLURM_PROCID.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/slurm_gpu.sh --config CONFIG --workdir DIR [--nodes N --gpus-per-node G] [options] [-- TRAIN_ARGS...]

Outside a SLURM job: submits itself with `sbatch` (needs --nodes and --gpus-per-node).
Inside a job (also: `sbatch --nodes=2 --gpus-per-node=8 launch/slurm_gpu.sh --config ... --workdir ...` from the
repo root): `srun` starts one `python -m ahn_jax.train` per task with
--coordinator=FIRST_HOST:PORT --num_processes=$SLURM_NTASKS --process_id=$SLURM_PROCID.

Required:
  --config PATH        config file relative to the repo, e.g. configs/qwen3b_gdn.py
  --workdir DIR        output directory on a filesystem every node sees
  --nodes N            number of nodes (submission only)
  --gpus-per-node G    GPUs per node (submission only)
Options:
  --per-gpu            one process per GPU (each sees one GPU) instead of one process per node with all its GPUs
  --port PORT          coordinator port on the first host (default: 12321)
  --partition P, --account A, --time D-HH:MM:SS, --job-name NAME   passed to sbatch
  --repo DIR           repository checkout (default: the submit directory inside a job, else this script's repo)
  --python BIN         Python interpreter (default: python3)
  --dry-run            print the sbatch (or srun) command that would run, run nothing
  -h, --help           this text
Every other argument (e.g. --config.train.steps=100, --peak_tflops=989) and everything after `--` is passed to the
train command unchanged.
USAGE
}

die() { echo "slurm_gpu.sh: error: $*" >&2; echo "Run launch/slurm_gpu.sh --help for usage." >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"; }
is_posint() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }

# Shell-quote each argument for printing: bare when safe, else in single quotes (readable, and copy-pastable).
shq() {
  if [[ -n "$1" && "$1" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
quote_all() { local out="" a; for a in "$@"; do out+="$(shq "$a") "; done; printf '%s' "${out% }"; }

# The first host of a SLURM node list such as "gpu[03-05,09],big1" -> "gpu03" (scontrol when it is installed).
first_host() {
  local list="$1"
  if command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$list" | head -n 1
    return
  fi
  local first="${list%%,*}"
  if [[ "$list" =~ ^([^,\[]*)\[([^]]*)\](.*)$ ]]; then
    local prefix="${BASH_REMATCH[1]}" ranges="${BASH_REMATCH[2]}"
    if [[ "$prefix" == "${list%%[*}" && "$prefix" != *,* ]]; then
      local r="${ranges%%,*}"
      printf '%s%s\n' "$prefix" "${r%%-*}"
      return
    fi
  fi
  printf '%s\n' "$first"
}

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
config="" workdir="" nodes="" gpus="" per_gpu=0 port=12321 partition="" account="" time_limit="" job_name=""
repo="" python="python3" dry_run=0
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --config) need_value "$@"; config="$2"; shift 2 ;;
    --workdir) need_value "$@"; workdir="$2"; shift 2 ;;
    --nodes) need_value "$@"; nodes="$2"; shift 2 ;;
    --gpus-per-node) need_value "$@"; gpus="$2"; shift 2 ;;
    --port) need_value "$@"; port="$2"; shift 2 ;;
    --partition) need_value "$@"; partition="$2"; shift 2 ;;
    --account) need_value "$@"; account="$2"; shift 2 ;;
    --time) need_value "$@"; time_limit="$2"; shift 2 ;;
    --job-name) need_value "$@"; job_name="$2"; shift 2 ;;
    --repo) need_value "$@"; repo="$2"; shift 2 ;;
    --python) need_value "$@"; python="$2"; shift 2 ;;
    --config=*|--workdir=*|--nodes=*|--gpus-per-node=*|--port=*|--partition=*|--account=*|--time=*|--job-name=*|\
    --repo=*|--python=*)
      key="${1%%=*}"; set -- "$key" "${1#*=}" "${@:2}"; continue ;;
    --per-gpu) per_gpu=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra+=("$@"); break ;;
    *) extra+=("$1"); shift ;;
  esac
done

missing=()
[[ -n "$config" ]] || missing+=(--config)
[[ -n "$workdir" ]] || missing+=(--workdir)
inside_job=0
[[ -z "${SLURM_JOB_ID:-}" ]] || inside_job=1
if [[ $inside_job -eq 0 ]]; then
  [[ -n "$nodes" ]] || missing+=(--nodes)
  [[ -n "$gpus" ]] || missing+=(--gpus-per-node)
fi
[[ ${#missing[@]} -eq 0 ]] || die "missing required argument(s): ${missing[*]}"
[[ -z "$nodes" ]] || is_posint "$nodes" || die "--nodes must be a positive integer, got '$nodes'"
[[ -z "$gpus" ]] || is_posint "$gpus" || die "--gpus-per-node must be a positive integer, got '$gpus'"
is_posint "$port" || die "--port must be a positive integer, got '$port'"

if [[ $inside_job -eq 0 ]]; then
  # Submission: sbatch this script again with the same training arguments; it takes the branch below in the job.
  repo="${repo:-$(dirname "$script_dir")}"
  tasks_per_node=1
  [[ $per_gpu -eq 0 ]] || tasks_per_node="$gpus"
  cmd=(sbatch "--nodes=$nodes" "--gpus-per-node=$gpus" "--ntasks-per-node=$tasks_per_node" "--chdir=$repo")
  [[ -z "$partition" ]] || cmd+=("--partition=$partition")
  [[ -z "$account" ]] || cmd+=("--account=$account")
  [[ -z "$time_limit" ]] || cmd+=("--time=$time_limit")
  [[ -z "$job_name" ]] || cmd+=("--job-name=$job_name")
  cmd+=("$script_dir/slurm_gpu.sh" "--config=$config" "--workdir=$workdir" "--port=$port" "--repo=$repo"
        "--python=$python")
  [[ $per_gpu -eq 0 ]] || cmd+=(--per-gpu)
  cmd+=(-- ${extra[@]+"${extra[@]}"})
  if [[ $dry_run -eq 1 ]]; then quote_all "${cmd[@]}"; echo; exit 0; fi
  command -v sbatch >/dev/null || die "sbatch not found: run this on a SLURM login node"
  exec "${cmd[@]}"
fi

# Inside the job: everything jax.distributed needs comes from SLURM's environment.
[[ -n "${SLURM_JOB_NODELIST:-}" ]] || die "SLURM_JOB_ID is set but SLURM_JOB_NODELIST is not (not a SLURM job?)"
[[ -n "${SLURM_NTASKS:-}" ]] || die "SLURM_NTASKS is not set: give the job --ntasks-per-node (or --ntasks)"
is_posint "$SLURM_NTASKS" || die "SLURM_NTASKS must be a positive integer, got '$SLURM_NTASKS'"
repo="${repo:-${SLURM_SUBMIT_DIR:-$(dirname "$script_dir")}}"
coordinator="$(first_host "$SLURM_JOB_NODELIST"):$port"

# The per-task shell expands $SLURM_PROCID (and $SLURM_LOCALID), which differ between tasks.
task="cd $(shq "$repo") && "
if [[ $per_gpu -eq 1 ]]; then
  # The LOCALID-th of the GPUs SLURM gave this node (or of all GPUs when it sets no CUDA_VISIBLE_DEVICES).
  task+='export CUDA_VISIBLE_DEVICES=$(echo "${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 63)}" | cut -d, -f$((SLURM_LOCALID + 1))) && '
fi
task+="exec $(quote_all "$python" -m ahn_jax.train "--config=$config" "--workdir=$workdir" \
  "--coordinator=$coordinator" "--num_processes=$SLURM_NTASKS")"
task+=' --process_id=$SLURM_PROCID'
[[ ${#extra[@]} -eq 0 ]] || task+=" $(quote_all "${extra[@]}")"

cmd=(srun --kill-on-bad-exit=1 "--ntasks=$SLURM_NTASKS" bash -c "$task")
if [[ $dry_run -eq 1 ]]; then quote_all "${cmd[@]}"; echo; exit 0; fi
command -v srun >/dev/null || die "srun not found inside the SLURM job"
exec "${cmd[@]}"
