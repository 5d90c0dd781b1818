"""What a run reports: metrics.jsonl, TensorBoard scalars and images, progress, sample grids.

Only process 0 writes; the writer is a no-op elsewhere.
"""

import json
import math
import logging
import os
import sys
import time
import uuid

import numpy as np
from PIL import Image

from flowjax import storage

METRICS_FILE = "metrics.jsonl"


def _lines(path: str) -> list[str]:
  if not storage.exists(path):
    return []
  return storage.read_text(path).splitlines(keepends=True)


def truncate_metrics(workdir: str, step: int) -> None:
  """Keeps only complete records with record["step"] <= step (used on resume)."""
  path = storage.join(workdir, METRICS_FILE)
  if not storage.exists(path):
    return
  kept = []
  for line in _lines(path):
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if line.endswith("\n") and record.get("step", step + 1) <= step:
      kept.append(line)
  storage.write_text(path, "".join(kept))


def last_logged_step(workdir: str) -> int | None:
  """The largest step of the complete records in metrics.jsonl (None: no file or no record)."""
  steps = []
  for line in _lines(storage.join(workdir, METRICS_FILE)):
    try:
      steps.append(int(json.loads(line)["step"]))
    except (ValueError, KeyError, TypeError):
      continue
  return max(steps) if steps else None


def read_metrics(workdir: str) -> list[dict]:
  return [json.loads(line) for line in _lines(storage.join(workdir, METRICS_FILE))
          if line.strip()]


class _QuietLibraries(logging.Filter):
  """Drops the INFO chatter of orbax and grain; their warnings and errors still show."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or not any(
        f"/{lib}/" in record.pathname for lib in ("orbax", "grain", "array_record"))


def quiet_libraries() -> None:
  from absl import logging as absl_logging
  for handler in [absl_logging.get_absl_handler(), *logging.getLogger().handlers]:
    handler.addFilter(_QuietLibraries())


class Writer:
  """metrics.jsonl + TensorBoard (tensorboardX, no TensorFlow needed) on process 0.

  On object storage (an object cannot be appended to) the records wait in memory and the event
  files on local disk until `flush` or `close` (each checkpoint, the end of a run). The records
  are then added to metrics.jsonl; the events go in segments: each flush closes the local event
  file, uploads it once as its own object under tensorboard/ (TensorBoard reads every event file
  of a directory) and deletes it, so a flush costs what was logged since the last one, not the
  whole run so far.
  """

  def __init__(self, workdir: str, enabled: bool):
    self.workdir = workdir
    self.enabled = enabled
    self._tb = None
    self._remote = storage.is_remote(workdir)
    self._pending = []
    self._events = None
    self._segment = 0
    self._closed = False
    # Segment names: the event file's time and host, then this writer's tag and a count, so that
    # two writers of one second (a run, then an evaluation in the same process) never collide.
    self._tag = uuid.uuid4().hex[:8]
    if enabled:
      storage.makedirs(workdir)
      if self._remote:
        import tempfile
        self._events = tempfile.mkdtemp(prefix="flowjax_tensorboard_")
      else:
        self._tb = self._summary_writer(storage.join(workdir, "tensorboard"), f".{self._tag}")

  @staticmethod
  def _summary_writer(directory: str, suffix: str = ""):
    from tensorboardX import SummaryWriter
    return SummaryWriter(directory, filename_suffix=suffix)

  def _board(self):
    """The open SummaryWriter; on object storage a new local segment after each upload (its
    name tagged and numbered, so two segments of one second never share a file)."""
    if self._tb is None:
      self._segment += 1
      self._tb = self._summary_writer(self._events, f".{self._tag}.{self._segment:06d}")
    return self._tb

  def _check_open(self) -> None:
    if self._closed:
      raise ValueError(f"The metrics writer of {self.workdir} is closed; nothing more can be "
                       "logged through it.")

  def scalars(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    self._check_open()
    record = {"step": int(step), **{k: _to_python(v) for k, v in values.items()}}
    # Strict JSON: a non-finite value (a skipped step's loss) is written as null.
    line = json.dumps({k: v if v is None or math.isfinite(v) else None
                       for k, v in record.items()}, allow_nan=False) + "\n"
    if self._remote:
      self._pending.append(line)
    else:
      storage.append_text(storage.join(self.workdir, METRICS_FILE), line)
    board = None
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
        board = board or self._board()
        board.add_scalar(key, value, step)

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    """image: [H, W, 3] uint8."""
    if self.enabled:
      self._check_open()
      self._board().add_image(name, image, step, dataformats="HWC")

  def flush(self) -> None:
    if self._remote:
      self._upload()
    elif self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    self._closed = True
    if self._remote:
      self._upload()
      if self._events is not None:
        import shutil
        shutil.rmtree(self._events, ignore_errors=True)
        self._events = None
    elif self._tb is not None:
      self._tb.close()
      self._tb = None

  def _upload(self) -> None:
    """Object storage: the new metrics records, then the event segment written since the last
    upload (closed, uploaded, deleted locally)."""
    if not (self.enabled and self._remote):
      return
    if self._pending:
      storage.append_text(storage.join(self.workdir, METRICS_FILE), "".join(self._pending))
      self._pending = []
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._events is not None:
      for name in sorted(os.listdir(self._events)):
        local = os.path.join(self._events, name)
        if os.path.isfile(local):
          with open(local, "rb") as f:
            storage.write_bytes(storage.join(self.workdir, "tensorboard", name), f.read())
          os.remove(local)


def _to_python(value):
  value = np.asarray(value)
  if value.dtype.kind in "iub":
    return int(value)
  return float(value)


class Progress:
  """A live progress line on a terminal; periodic log lines otherwise (CI, pod logs)."""

  def __init__(self, total_steps: int, batch_size: int, start_step: int, mode: str = "auto",
               enabled: bool = True):
    self.total = total_steps
    self.batch_size = batch_size
    self.enabled = enabled
    self.live = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
    self._last_time = time.perf_counter()
    self._last_step = start_step

  def rate(self, step: int) -> float:
    """Steps per second since the previous call."""
    now = time.perf_counter()
    steps = step - self._last_step
    rate = steps / max(now - self._last_time, 1e-9) if steps > 0 else 0.0
    self._last_time, self._last_step = now, step
    return rate

  def report(self, step: int, loss: float, steps_per_sec: float,
             error: float | None = None) -> None:
    """One progress line; `error`: the unweighted error, shown when the loss is reweighted."""
    if not self.enabled:
      return
    eta = (self.total - step) / steps_per_sec if steps_per_sec > 0 else float("inf")
    shown = f"  error {error:.4g}" if error is not None else ""
    line = (f"step {step}/{self.total}  loss {loss:.4f}{shown}  {steps_per_sec:.2f} steps/s  "
            f"{steps_per_sec * self.batch_size:.1f} examples/s  ETA {format_seconds(eta)}")
    if self.live:
      sys.stderr.write("\r" + line.ljust(100))
      sys.stderr.flush()
    else:
      logging.info(line)

  def done(self) -> None:
    if self.enabled and self.live:
      sys.stderr.write("\n")


def format_seconds(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def image_grid(images: np.ndarray, columns: int | None = None, min_cell: int = 32) -> np.ndarray:
  """images: [N, H, W, C] in [-1, 1] -> one [rows * h, columns * w, 3] uint8 grid, each image
  upscaled (nearest) to at least `min_cell` pixels."""
  images = np.asarray(images, np.float32)
  n, h, w, c = images.shape
  columns = columns or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / columns))
  scale = max(1, int(np.ceil(min_cell / max(h, w))))
  pixels = np.clip((images + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
  if c == 1:
    pixels = np.repeat(pixels, 3, axis=-1)
  elif c != 3:
    pixels = np.repeat(pixels[..., :1], 3, axis=-1)
  pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
  h, w = h * scale, w * scale
  pad = 2
  grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
  for i in range(n):
    r, col = divmod(i, columns)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + col * (w + pad):pad + col * (w + pad) + w] = pixels[i]
  return grid


def scatter_image(points: np.ndarray, size: int = 256, extent: float = 4.0) -> np.ndarray:
  """points: [N, 2] -> [size, size, 3] uint8 density picture of [-extent, extent]^2."""
  points = np.asarray(points, np.float32)
  hist, _, _ = np.histogram2d(points[:, 1], points[:, 0], bins=size,
                              range=[[-extent, extent], [-extent, extent]])
  hist = hist[::-1]
  density = np.log1p(hist) / max(np.log1p(hist).max(), 1e-9)
  gray = (255 * (1.0 - density)).astype(np.uint8)
  return np.stack([gray] * 3, axis=-1)


def samples_picture(samples: np.ndarray) -> np.ndarray:
  """A picture of samples: an image grid for [N, H, W, C], a density plot for [N, 2]."""
  samples = np.asarray(samples)
  if samples.ndim == 2 and samples.shape[1] == 2:
    return scatter_image(samples)
  return image_grid(samples)


def save_png(path: str, image: np.ndarray) -> None:
  import io
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  storage.write_bytes(path, buffer.getvalue())
