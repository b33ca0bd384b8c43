#!/usr/bin/env bash
# Download ahn_jax's dependencies as wheels for another machine's Python version and platform (GPU/TPU hosts without
# network access), build ahn_jax's own wheel beside them, and print the install command to run over there.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/prepare_wheels.sh --dest DIR [options]

Runs, on a machine with network access:
  python3 -m pip wheel --no-deps --wheel-dir DIR REPO                      (ahn_jax itself)
  python3 -m pip download --dest DIR --only-binary=:all: --python-version V --implementation cp --platform P DEPS...
where DEPS are pyproject.toml's dependencies (plus the chosen extras). Then, on the offline machine (copy DIR there):
  python3 -m pip install --no-index --find-links DIR 'ahn-jax[EXTRAS]'

Required:
  --dest DIR              folder for the wheels (created)
Options:
  --python-version V      target Python, e.g. 3.12 (default: 3.12, the GPU image's)
  --platform TAG          target platform tag (repeatable; default: manylinux_2_28_x86_64, which also accepts older
                          manylinux wheels); e.g. manylinux_2_28_aarch64 for GH200
  --extras LIST           comma-separated extras of the project to include: gpu, tpu, test
  --packages "A B ..."    download only these requirements instead of the project and its dependencies
                          (e.g. "grain ml-collections tensorflow-datasets" for an image that has the rest)
  --pip "CMD"             pip command (default: "python3 -m pip")
  --dry-run               print the commands that would run, run nothing
  -h, --help              this text
USAGE
}

die() { echo "prepare_wheels.sh: error: $*" >&2; echo "Run launch/prepare_wheels.sh --help for usage." >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"; }
shq() {
  if [[ -n "$1" && "$1" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
quote_all() { local out="" a; for a in "$@"; do out+="$(shq "$a") "; done; printf '%s' "${out% }"; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="" pyver="3.12" extras="" packages="" pip="python3 -m pip" dry_run=0 have_packages=0
platforms=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dest) need_value "$@"; dest="$2"; shift 2 ;;
    --python-version) need_value "$@"; pyver="$2"; shift 2 ;;
    --platform) need_value "$@"; platforms+=("$2"); shift 2 ;;
    --extras) need_value "$@"; extras="$2"; shift 2 ;;
    --packages) need_value "$@"; packages="$2"; have_packages=1; shift 2 ;;
    --pip) need_value "$@"; pip="$2"; shift 2 ;;
    --dest=*|--python-version=*|--platform=*|--extras=*|--packages=*|--pip=*)
      key="${1%%=*}"; set -- "$key" "${1#*=}" "${@:2}"; continue ;;
    --dry-run) dry_run=1; shift ;;
    *) die "unknown argument '$1'" ;;
  esac
done

[[ -n "$dest" ]] || die "missing required argument(s): --dest"
[[ "$pyver" =~ ^3\.[0-9]+$ ]] || die "--python-version must look like 3.12, got '$pyver'"
[[ ${#platforms[@]} -gt 0 ]] || platforms=(manylinux_2_28_x86_64)
[[ -z "$extras" || "$extras" =~ ^[a-z0-9_-]+(,[a-z0-9_-]+)*$ ]] || die "--extras must be a comma-separated list, got '$extras'"

read -r -a pip_cmd <<<"$pip"
if [[ $have_packages -eq 1 ]]; then
  read -r -a reqs <<<"$packages"
  [[ ${#reqs[@]} -gt 0 ]] || die "--packages is empty"
  install_target=("${reqs[@]}")
else
  [[ -f "$repo/pyproject.toml" ]] || die "no pyproject.toml in $repo"
  # The requirement list comes from pyproject.toml (one source of truth); tomllib is in Python >= 3.11.
  reqs_text="$(python3 - "$repo/pyproject.toml" "$extras" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
reqs = list(project.get("dependencies", []))
optional = project.get("optional-dependencies", {})
for extra in filter(None, sys.argv[2].split(",")):
    if extra not in optional:
        sys.exit(f"prepare_wheels.sh: error: pyproject.toml has no extra {extra!r} (it has {sorted(optional)})")
    reqs += [r for r in optional[extra] if r not in reqs]
print("\n".join(reqs))
PY
  )" || exit 2
  mapfile -t reqs <<<"$reqs_text"
  [[ ${#reqs[@]} -gt 0 ]] || die "could not read the dependencies from $repo/pyproject.toml"
  target="ahn-jax"
  [[ -z "$extras" ]] || target="ahn-jax[$extras]"
  install_target=("$target")
fi

platform_args=()
for p in "${platforms[@]}"; do platform_args+=(--platform "$p"); done
download=("${pip_cmd[@]}" download --dest "$dest" --only-binary=:all: --python-version "$pyver" --implementation cp
          "${platform_args[@]}" "${reqs[@]}")
own_wheel=("${pip_cmd[@]}" wheel --no-deps --wheel-dir "$dest" "$repo")
install=(python3 -m pip install --no-index --find-links "$dest" "${install_target[@]}")

if [[ $dry_run -eq 1 ]]; then
  echo "mkdir -p $(shq "$dest")"
  [[ $have_packages -eq 1 ]] || { quote_all "${own_wheel[@]}"; echo; }
  quote_all "${download[@]}"; echo
  echo "# then, on the offline machine (after copying $(shq "$dest") there):"
  echo "# $(quote_all "${install[@]}")"
  exit 0
fi

mkdir -p "$dest"
[[ $have_packages -eq 1 ]] || "${own_wheel[@]}"
"${download[@]}"
echo "Wheels are in $dest. On the offline machine (after copying the folder there), run:"
quote_all "${install[@]}"; echo
