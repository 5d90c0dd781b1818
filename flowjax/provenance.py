"""Where a result came from: the commit it ran at and the machine it ran on, for result files."""

import os
import platform
import subprocess
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Where result files and pictures are committed: writing one is not a change to the code that
# produced the next.
_OUTPUTS = ("experiments/results", "experiments/gallery")


def commit() -> dict:
  """{"commit": HEAD of the flowjax checkout ("" outside git), "uncommitted_changes": whether
  files other than committed results and pictures (experiments/results, experiments/gallery)
  differ from HEAD}."""
  def git(*args):
    try:
      return subprocess.run(["git", *args], cwd=_ROOT, capture_output=True, text=True,
                            timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return ""
  return {"commit": git("rev-parse", "HEAD"),
          "uncommitted_changes": bool(git("status", "--porcelain", "--", ".",
                                          *(f":(exclude){path}" for path in _OUTPUTS)))}


def machine() -> dict:
  """CPU model (/proc/cpuinfo), core count, platform, Python and jax versions and the devices
  jax computes on ("8 x cpu", "1 x NVIDIA H200")."""
  import jax
  cpu = platform.processor()
  if os.path.isfile("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else cpu
  devices = jax.devices()
  return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
          "python": platform.python_version(), "jax": jax.__version__,
          "devices": f"{len(devices)} x {devices[0].device_kind}"}


def header(command: str) -> dict:
  """The record a result file starts with: command, commit, date and machine."""
  return {"command": command, **commit(), "date": time.strftime("%Y-%m-%d"),
          "machine": machine()}
