#!/usr/bin/env bash
# Runs flowjax on several GPU nodes: one process per node, each seeing all GPUs of its node,
# joined by jax.distributed.
#
#   launch/gpu_multinode.sh [flowjax.main arguments...]
#
# Under SLURM (SLURM_JOB_ID set, e.g. inside an sbatch script): starts one task per node of the
# allocation with srun. Each task derives its flags from SLURM: the coordinator is the first host
# of the step's node list (scontrol show hostnames) at PORT, --num_processes=$SLURM_NTASKS,
# --process_id=$SLURM_PROCID.
#   sbatch --nodes=2 --gpus-per-node=8 --wrap 'launch/gpu_multinode.sh --config=... --workdir=...'
#
# Without SLURM: runs one process on this machine from COORDINATOR_ADDRESS (host:port of process
# 0), NUM_PROCESSES and PROCESS_ID; run it on every node, with PROCESS_ID 0..NUM_PROCESSES-1.
#   COORDINATOR_ADDRESS=node0:12355 NUM_PROCESSES=2 PROCESS_ID=0 launch/gpu_multinode.sh ...
#
# Environment: PYTHON (default python3), PORT (SLURM only; default 12000 + SLURM_JOB_ID % 20000),
# SRUN_ARGS (extra srun arguments, split on spaces), PRINT_ONLY=1 (print the commands, run nothing).
set -euo pipefail
usage() {
  echo "usage: $0 [flowjax.main arguments...]" >&2
  echo "  under SLURM: run inside an allocation (SLURM_JOB_ID set); env PORT SRUN_ARGS PYTHON PRINT_ONLY=1" >&2
  echo "  otherwise:   COORDINATOR_ADDRESS=host:port NUM_PROCESSES=N PROCESS_ID=I $0 ... (on every node)" >&2
  exit 2
}
case "${1:-}" in
  -h | --help) usage ;;
esac
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [ "${FLOWJAX_SRUN_TASK:-0}" != 1 ]; then
  require_config_and_workdir "$@"
fi
python=${PYTHON:-python3}
script=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")

# Quoted for the shell, so that arguments with spaces or brackets pass through unchanged.
args=""
if [ $# -gt 0 ]; then
  printf -v args ' %q' "$@"
fi
show_or_run() {  # show_or_run COMMAND_LINE (already shell-quoted)
  if [ "${PRINT_ONLY:-0}" = 1 ]; then
    echo "$1"
  else
    eval "exec $1"
  fi
}
flowjax_command() {  # flowjax_command COORDINATOR NUM_PROCESSES PROCESS_ID
  echo "$(printf '%q' "$python") -m flowjax.main --coordinator_address=$(printf '%q' "$1") \
--num_processes=$2 --process_id=$3$args"
}
is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }

if [ "${FLOWJAX_SRUN_TASK:-0}" = 1 ]; then
  # One srun task: derive the process's flags from SLURM.
  nodelist=${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-}}
  if [ -z "$nodelist" ] || ! is_int "${SLURM_NTASKS:-}" || ! is_int "${SLURM_PROCID:-}"; then
    echo "$0: an srun task needs SLURM_JOB_NODELIST, SLURM_NTASKS and SLURM_PROCID" >&2
    usage
  fi
  hosts=$(scontrol show hostnames "$nodelist")
  head_node=${hosts%%$'\n'*}
  port=${PORT:-$((12000 + ${SLURM_JOB_ID:-0} % 20000))}
  show_or_run "$(flowjax_command "$head_node:$port" "$SLURM_NTASKS" "$SLURM_PROCID")"
elif [ -n "${SLURM_JOB_ID:-}" ]; then
  # The batch script: one task per node; every task runs this script again in task mode.
  nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-}}
  if ! is_int "$nodes" || ! is_int "$SLURM_JOB_ID"; then
    echo "$0: SLURM_JOB_ID is set but SLURM_NNODES is not a node count" >&2
    usage
  fi
  port=${PORT:-$((12000 + SLURM_JOB_ID % 20000))}
  srun_args=()
  if [ -n "${SRUN_ARGS:-}" ]; then
    read -r -a srun_args <<<"$SRUN_ARGS"
  fi
  printf -v srun ' %q' srun "--nodes=$nodes" "--ntasks=$nodes" --ntasks-per-node=1 \
    "${srun_args[@]}" env FLOWJAX_SRUN_TASK=1 "PORT=$port" "PYTHON=$python" bash "$script"
  show_or_run "${srun:1}$args"
else
  problems=()
  if [ -z "${COORDINATOR_ADDRESS:-}" ]; then
    problems+=("COORDINATOR_ADDRESS is not set (host:port of the process with PROCESS_ID=0)")
  elif ! [[ "$COORDINATOR_ADDRESS" =~ ^[^:[:space:]]+:[0-9]+$ ]]; then
    problems+=("COORDINATOR_ADDRESS='$COORDINATOR_ADDRESS' is not host:port")
  fi
  if [ -z "${NUM_PROCESSES:-}" ]; then
    problems+=("NUM_PROCESSES is not set (the number of nodes)")
  elif ! is_int "$NUM_PROCESSES" || [ "$NUM_PROCESSES" -lt 1 ]; then
    problems+=("NUM_PROCESSES='$NUM_PROCESSES' is not a positive integer")
  fi
  if [ -z "${PROCESS_ID:-}" ]; then
    problems+=("PROCESS_ID is not set (0 to NUM_PROCESSES-1, different on every node)")
  elif ! is_int "$PROCESS_ID"; then
    problems+=("PROCESS_ID='$PROCESS_ID' is not a non-negative integer")
  fi
  if [ ${#problems[@]} -gt 0 ]; then
    for problem in "${problems[@]}"; do
      echo "$0: without SLURM, $problem" >&2
    done
    usage
  fi
  if [ "$PROCESS_ID" -ge "$NUM_PROCESSES" ]; then
    echo "$0: PROCESS_ID=$PROCESS_ID must be below NUM_PROCESSES=$NUM_PROCESSES" >&2
    usage
  fi
  show_or_run "$(flowjax_command "$COORDINATOR_ADDRESS" "$NUM_PROCESSES" "$PROCESS_ID")"
fi
