#!/usr/bin/env bash
# Runs flowjax on every worker of a Cloud TPU VM (a single host or a pod slice) with gcloud.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [flowjax.main arguments...]
#   PRINT_ONLY=1 CREATE=1 SETUP=1 ACCELERATOR_TYPE=v4-32 launch/tpu_pod.sh my-tpu us-central2-b \
#     --config=experiments/fm_toy2d.py --workdir=gs://bucket/run   # show the gcloud commands
#
# Steps, in order:
#   CREATE=1  create the TPU VM (gcloud compute tpus tpu-vm create); default: reuse an existing one
#   code      every run: git clone/pull REPO_URL on all workers, or, without REPO_URL, copy this
#             checkout (without .git, virtualenvs and caches) with tpu-vm scp --worker=all
#             (SYNC=0 skips this step)
#   SETUP=1   python3 -m venv + pip install -e '.[tpu]' on all workers
#   run       the same `python -m flowjax.main ARGS` on all workers (tpu-vm ssh --worker=all);
#             jax.distributed auto-detects the pod, so no coordinator flags are passed
#
# Environment: ACCELERATOR_TYPE (e.g. v4-32; required with CREATE=1), RUNTIME_VERSION (default
# chosen from ACCELERATOR_TYPE, tpu-ubuntu2204-base for v2-v4), PROJECT (optional, else gcloud's
# default), REPO_URL (optional), REMOTE_DIR (default flowjax, relative to the home directory on
# the workers), PRINT_ONLY=1 (print every command, run nothing).
# Use a gs:// --workdir: every worker writes its own shards of each checkpoint.
set -euo pipefail
usage() {
  echo "usage: $0 TPU_NAME ZONE [flowjax.main arguments...]" >&2
  echo "  env: ACCELERATOR_TYPE RUNTIME_VERSION PROJECT REPO_URL REMOTE_DIR CREATE=1 SETUP=1 SYNC=0 PRINT_ONLY=1" >&2
  exit 2
}
if [ $# -lt 2 ] || [ -z "$1" ] || [ -z "$2" ]; then
  usage
fi
name=$1
zone=$2
shift 2
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_config_and_workdir "$@"
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
remote_dir=${REMOTE_DIR:-flowjax}
accelerator=${ACCELERATOR_TYPE:-}
if [ "${CREATE:-0}" = 1 ] && [ -z "$accelerator" ]; then
  echo "$0: CREATE=1 needs ACCELERATOR_TYPE (e.g. v4-32, v5litepod-16, v5p-32, v6e-16)" >&2
  usage
fi
if [ -n "${RUNTIME_VERSION:-}" ]; then
  runtime=$RUNTIME_VERSION
else
  case "$accelerator" in
    v5litepod-* | v5e-*) runtime=v2-alpha-tpuv5-lite ;;
    v5p-*) runtime=v2-alpha-tpuv5 ;;
    v6e-*) runtime=v2-alpha-tpuv6e ;;
    *) runtime=tpu-ubuntu2204-base ;;
  esac
fi
project=()
if [ -n "${PROJECT:-}" ]; then
  project=("--project=$PROJECT")
fi
tpu=(gcloud compute tpus tpu-vm)
on_all() {  # on_all REMOTE_SHELL_COMMAND: the command run on every worker
  step "${tpu[@]}" ssh "$name" "--zone=$zone" "${project[@]}" --worker=all "--command=$1"
}

# One command per step; printed shell-quoted (copy-paste safe) or run.
step() {
  if [ "${PRINT_ONLY:-0}" = 1 ]; then
    local line
    printf -v line ' %q' "$@"
    echo "${line:1}"
  else
    "$@"
  fi
}

qdir=$(printf '%q' "$remote_dir")
if [ "${CREATE:-0}" = 1 ]; then
  step "${tpu[@]}" create "$name" "--zone=$zone" "${project[@]}" \
    "--accelerator-type=$accelerator" "--version=$runtime"
fi

if [ "${SYNC:-1}" = 1 ]; then
  if [ -n "${REPO_URL:-}" ]; then
    qurl=$(printf '%q' "$REPO_URL")
    on_all "if [ -d $qdir/.git ]; then git -C $qdir pull --ff-only; else git clone $qurl $qdir; fi"
  else
    archive=${TMPDIR:-/tmp}/flowjax-$name.tar.gz
    step tar -C "$root" -czf "$archive" --exclude=.git --exclude=.venv --exclude=venv \
      --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache .
    step "${tpu[@]}" scp "$archive" "$name:flowjax.tar.gz" "--zone=$zone" "${project[@]}" --worker=all
    on_all "mkdir -p $qdir && tar -xzf flowjax.tar.gz -C $qdir && rm flowjax.tar.gz"
  fi
fi

if [ "${SETUP:-0}" = 1 ]; then
  on_all "cd $qdir && python3 -m venv .venv && .venv/bin/pip install -U pip && .venv/bin/pip install -e '.[tpu]'"
fi

# Quoted for the remote shell, so that arguments with spaces or brackets pass through unchanged.
args=""
if [ $# -gt 0 ]; then
  printf -v args ' %q' "$@"
fi
on_all "cd $qdir && .venv/bin/python -m flowjax.main$args"
