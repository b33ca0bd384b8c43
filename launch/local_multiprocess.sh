#!/usr/bin/env bash
# N training processes on this machine's CPU, joined by jax.distributed through localhost: a way to test multi-process
# code paths (per-process data shards, process-0-only logging, multi-host checkpoints) without a cluster.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/local_multiprocess.sh --config CONFIG --workdir DIR [options] [-- TRAIN_ARGS...]

Starts N CPU processes of `python -m ahn_jax.train ... --coordinator=localhost:PORT --num_processes=N
--process_id=I`, each with XLA_FLAGS=--xla_force_host_platform_device_count=K (K fake devices per process), waits
for all of them, and stops the others if one fails. Process I logs to WORKDIR/logs/process_I.log.

Required:
  --config PATH              config file, e.g. configs/tiny_gdn.py
  --workdir DIR              output directory shared by the processes
Options:
  --num-processes N          processes to start (default: 2)
  --devices-per-process K    fake CPU devices per process (default: 1)
  --port PORT                coordinator port on localhost (default: 12355)
  --python BIN               Python interpreter (default: python3)
  --dry-run                  print the commands that would run (one per process), run nothing
  -h, --help                 this text
Every other argument (e.g. --config.train.steps=4) and everything after `--` is passed to the train command.
Note: train.batch_size must be a multiple of N.
USAGE
}

die() { echo "local_multiprocess.sh: error: $*" >&2; echo "Run launch/local_multiprocess.sh --help for usage." >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"; }
is_posint() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
shq() {
  if [[ -n "$1" && "$1" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
quote_all() { local out="" a; for a in "$@"; do out+="$(shq "$a") "; done; printf '%s' "${out% }"; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
config="" workdir="" nproc=2 ndev=1 port=12355 python="python3" dry_run=0
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --config) need_value "$@"; config="$2"; shift 2 ;;
    --workdir) need_value "$@"; workdir="$2"; shift 2 ;;
    --num-processes) need_value "$@"; nproc="$2"; shift 2 ;;
    --devices-per-process) need_value "$@"; ndev="$2"; shift 2 ;;
    --port) need_value "$@"; port="$2"; shift 2 ;;
    --python) need_value "$@"; python="$2"; shift 2 ;;
    --config=*|--workdir=*|--num-processes=*|--devices-per-process=*|--port=*|--python=*)
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
is_posint "$nproc" || die "--num-processes must be a positive integer, got '$nproc'"
is_posint "$ndev" || die "--devices-per-process must be a positive integer, got '$ndev'"
is_posint "$port" || die "--port must be a positive integer, got '$port'"

# Keep the caller's other XLA flags, but the device count is ours (a second one would silently win or lose).
xla_flags=""
for f in ${XLA_FLAGS:-}; do
  [[ "$f" == --xla_force_host_platform_device_count=* ]] || xla_flags+="$f "
done
xla_flags+="--xla_force_host_platform_device_count=$ndev"

process_cmd() {  # the command of process $1, as an array in `cmd`
  cmd=(env JAX_PLATFORMS=cpu "XLA_FLAGS=$xla_flags" "$python" -m ahn_jax.train "--config=$config"
       "--workdir=$workdir" "--coordinator=localhost:$port" "--num_processes=$nproc" "--process_id=$1"
       ${extra[@]+"${extra[@]}"})
}

if [[ $dry_run -eq 1 ]]; then
  echo "cd $(shq "$repo")"
  for ((i = 0; i < nproc; i++)); do process_cmd "$i"; quote_all "${cmd[@]}"; echo; done
  exit 0
fi

cd "$repo"
mkdir -p "$workdir/logs"
pids=()
stop_all() {  # stop only the processes this script started, by pid
  local p
  for p in ${pids[@]+"${pids[@]}"}; do kill "$p" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM
for ((i = 0; i < nproc; i++)); do
  process_cmd "$i"
  "${cmd[@]}" >"$workdir/logs/process_$i.log" 2>&1 &
  pids+=($!)
  echo "started process $i (pid $!): log $workdir/logs/process_$i.log"
done

# Poll until every process has ended; on the first failure stop the rest (they would hang waiting for their peer).
# (Polling, not `wait -n`, so that each exit status is read exactly once on any bash version.)
status=0
running=("${pids[@]}")
while [[ ${#running[@]} -gt 0 ]]; do
  still=()
  for p in "${running[@]}"; do
    if kill -0 "$p" 2>/dev/null; then still+=("$p"); continue; fi
    rc=0
    wait "$p" || rc=$?
    if [[ $rc -ne 0 && $status -eq 0 ]]; then
      status=$rc
      echo "local_multiprocess.sh: process with pid $p exited with status $rc; stopping the others" >&2
      stop_all
    fi
  done
  running=(${still[@]+"${still[@]}"})
  [[ ${#running[@]} -eq 0 ]] || sleep 1
done
trap - INT TERM
if [[ $status -ne 0 ]]; then
  for ((i = 0; i < nproc; i++)); do
    echo "---- tail of $workdir/logs/process_$i.log" >&2
    tail -n 20 "$workdir/logs/process_$i.log" >&2 || true
  done
  exit "$status"
fi
echo "all $nproc processes finished"
