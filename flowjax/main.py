"""Entry point: python -m flowjax.main --config=experiments/X.py[:preset] --workdir=DIR.

Parses flags, starts the multi-host runtime when asked, and hands over to train/eval/sample.
"""

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from flowjax import metrics

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, with an optional preset: "
    "--config=experiments/NAME.py[:PRESET]. Any key is overridden with --config.SECTION.KEY=VALUE "
    "(e.g. --config.optim.lr=3e-4 --config.mesh.fsdp=8). `python -m flowjax.catalog` lists the "
    "experiments with their presets, and the objectives, models and data sources.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to do.")
_PROMPTS = flags.DEFINE_string(
    "prompts", None, "With --mode=sample and a text model: a text file of prompts, one per "
    "line; writes samples/prompt_NN.png (and .npz) per prompt and samples/prompts.json.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume in a workdir whose config.json differs from --config.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("FLOWJAX_COORDINATOR_ADDRESS"),
    "host:port of process 0 for multi-process runs (or FLOWJAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", int(os.environ.get("FLOWJAX_NUM_PROCESSES", "1")),
    "Number of processes (or FLOWJAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", int(os.environ.get("FLOWJAX_PROCESS_ID", "0")),
    "This process's index (or FLOWJAX_PROCESS_ID).")
_NUM_CPU_DEVICES = flags.DEFINE_integer(
    "num_cpu_devices", None, "Fake CPU devices for this process (testing multi-device runs).")
_CPU_XLA_FLAGS = flags.DEFINE_bool(
    "cpu_xla_flags", True, "Start XLA with flowjax.sharding.CPU_XLA_FLAGS (XLA:CPU options that "
    "make U-Net training steps about 1.5x faster on CPU; ignored by accelerators). "
    "--nocpu_xla_flags keeps XLA's defaults; a value in XLA_FLAGS always wins.")

flags.mark_flags_as_required(["config", "workdir"])


def load_config():
  """The --config value, or one line naming the problem (a missing file, an unknown preset, an
  error inside the experiment file) and exit code 2."""
  try:
    config = _CONFIG.value
    config["objective"]  # a file that failed to load raises here, on first use
    return config
  except Exception as error:  # ml_collections wraps the file's own error in OSError/ValueError
    message = " ".join(str(error).split())
    marker = "earlier failure to load: "
    if marker in message:
      message = message.split(marker, 1)[1]
    missing = re.search(r"No such file or directory: '([^']+)'", message)
    if missing:
      message = f"no experiment file {missing.group(1)!r}"
    sys.stderr.write(f"FATAL --config: {message}\n`python -m flowjax.catalog` lists the "
                     "experiments and their presets.\n")
    sys.stderr.flush()
    os._exit(2)


def main(argv):
  del argv
  metrics.quiet_libraries()
  config = load_config()
  import jax
  from flowjax import sharding
  if _CPU_XLA_FLAGS.value and sharding.use_cpu_xla_flags():
    logging.info("XLA_FLAGS=%s", os.environ["XLA_FLAGS"])
  sharding.start_runtime(_NUM_CPU_DEVICES.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                         _PROCESS_ID.value)
  logging.info("flowjax: process %d of %d, %d local / %d global devices (%s).",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.default_backend())
  from flowjax import checkpoint, config as config_lib, health, modes, train
  user_errors = (config_lib.ConfigError, train.WorkdirError, train.NonFiniteError,
                 health.DivergenceError, checkpoint.CheckpointError, FileNotFoundError,
                 modes.PromptError)
  if _PROMPTS.value and _MODE.value != "sample":
    sys.stderr.write("FATAL --prompts is read by --mode=sample only.\n")
    exit_now(2)
  try:
    if _MODE.value == "train":
      train.run(config, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    elif _MODE.value == "eval":
      modes.run_eval(config, _WORKDIR.value)
    else:
      modes.run_sample(config, _WORKDIR.value, prompts=_PROMPTS.value)
  except user_errors as error:
    logging.error("%s: %s", type(error).__name__, error)
    exit_now(1)
  except KeyboardInterrupt:
    logging.error("Interrupted.")
    exit_now(130)
  except Exception:  # a bug or an environment failure: its traceback, then the same prompt exit
    logging.exception("flowjax stopped with an unexpected error:")
    exit_now(1)


def exit_now(code: int) -> None:
  """Exits with `code` without waiting for background threads: after a failed asynchronous
  save, orbax's signal-waiting threads never finish, and a pod job must end (and be restarted)
  rather than hang at interpreter shutdown. Everything written so far is flushed first."""
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def parse_flags(argv):
  """absl flag parsing that reports a bad --config override as one line, not a traceback."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
    message = str(error).replace("\\n", " ").replace("\\'", "'")
    if len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":
      message = message[1:-1]
    sys.stderr.write(f"FATAL flags error: {message}\nPass --helpfull to see the flags.\n")
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
