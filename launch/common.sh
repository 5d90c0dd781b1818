# Shared by the launchers (sourced, not run): checks on the flowjax.main arguments.

# require_config_and_workdir ARGS...: the flowjax.main arguments must name the experiment and the
# workdir; otherwise name what is missing and call the launcher's `usage` (exit 2), before any
# node, TPU or process is started.
require_config_and_workdir() {
  local has_config=0 has_workdir=0 arg
  local missing=()
  for arg in "$@"; do
    case "$arg" in
      --config=?* | --config) has_config=1 ;;
      --workdir=?* | --workdir) has_workdir=1 ;;
    esac
  done
  [ "$has_config" = 1 ] || missing+=("--config=experiments/<name>.py")
  [ "$has_workdir" = 1 ] || missing+=("--workdir=DIR")
  if [ ${#missing[@]} -gt 0 ]; then
    echo "$0: the flowjax.main arguments lack ${missing[*]}" >&2
    usage
  fi
}
