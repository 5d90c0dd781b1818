#!/usr/bin/env bash
# Runs NUM_PROCESSES flowjax processes on this machine, joined by jax.distributed over localhost
# (gloo CPU collectives), each with its share of fake CPU devices.
#
#   launch/local_multiprocess.sh NUM_PROCESSES [flowjax.main arguments...]
#   PRINT_ONLY=1 launch/local_multiprocess.sh 2 --config=... --workdir=...   # show the commands
#
# Environment: DEVICES_PER_PROCESS (default 2), PORT (default 12355), PYTHON (default python3).
# If one process fails, the others are stopped and the script exits with that process's status.
set -euo pipefail
usage() {
  echo "usage: $0 NUM_PROCESSES [flowjax.main arguments...]" >&2
  exit 2
}
if [ $# -lt 1 ]; then
  usage
fi
num_processes=$1
shift
if ! [[ "$num_processes" =~ ^[1-9][0-9]*$ ]]; then
  echo "$0: NUM_PROCESSES='$num_processes' is not a positive integer" >&2
  usage
fi
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_config_and_workdir "$@"
devices=${DEVICES_PER_PROCESS:-2}
port=${PORT:-12355}
python=${PYTHON:-python3}

# Quoted for the shell, so that arguments with spaces or brackets pass through unchanged.
args=""
if [ $# -gt 0 ]; then
  printf -v args ' %q' "$@"
fi
commands=()
for ((i = 0; i < num_processes; i++)); do
  commands+=("$(printf '%q' "$python") -m flowjax.main --coordinator_address=127.0.0.1:$port \
--num_processes=$num_processes --process_id=$i --num_cpu_devices=$devices$args")
done

if [ "${PRINT_ONLY:-0}" = 1 ]; then
  printf '%s\n' "${commands[@]}"
  exit 0
fi

pids=()
for cmd in "${commands[@]}"; do
  JAX_PLATFORMS=cpu bash -c "exec $cmd" &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT INT TERM

status=0
remaining=${#pids[@]}
while [ "$remaining" -gt 0 ]; do
  set +e
  wait -n "${pids[@]}"
  code=$?
  set -e
  remaining=$((remaining - 1))
  if [ "$code" -ne 0 ]; then
    echo "a flowjax process exited with status $code; stopping the others" >&2
    status=$code
    break
  fi
done
if [ "$status" -ne 0 ]; then
  kill "${pids[@]}" 2>/dev/null || true
  sleep 2
  kill -9 "${pids[@]}" 2>/dev/null || true
fi
wait 2>/dev/null || true
exit "$status"
