"""flowjax from Python (notebooks, scripts): the code paths of `python -m flowjax.main`.

  from flowjax import api
  config = api.get_config("quickstart", overrides={"train.steps": 300})
  api.train(config, "workdirs/quickstart")        # resumes when the workdir has checkpoints
  model = api.load("workdirs/quickstart")         # the newest good checkpoint, on all devices
  images = model.sample(16, num_steps=8, seed=0)  # [16, H, W, C] numpy in [-1, 1]
  api.show(images)                                # a PIL image (shown inline in a notebook)
  api.curves("workdirs/quickstart")               # matplotlib figure of metrics.jsonl
"""

import dataclasses

import jax
import ml_collections
import numpy as np

from flowjax import config as config_lib
from flowjax import metrics
from flowjax import plot
from flowjax import storage
from flowjax import train as train_lib


def get_config(experiment: str, preset: str | None = None,
               overrides: dict | None = None) -> ml_collections.ConfigDict:
  """The locked config of an experiment, as `--config=experiments/NAME.py:PRESET` builds it.

  experiment: a path, or a name in the checkout's experiments/ ("quickstart", "imm_toy2d");
  overrides: {"dotted.key": value}, as `--config.dotted.key=value` on the command line.
  """
  return config_lib.load_experiment(experiment, preset, **(overrides or {}))


def with_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """A locked copy of `config` with {"dotted.key": value} set (the original is unchanged)."""
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    config_lib.set_dotted(config, key, value)
  return config.lock()


def train(config: ml_collections.ConfigDict, workdir: str, steps: int | None = None,
          allow_config_change: bool = False):
  """Trains `config` in `workdir` up to `steps` (default train.steps) total steps, resuming from
  the workdir's latest checkpoint; returns the final TrainState. Interrupting the cell saves a
  checkpoint first, so calling again continues."""
  if steps is not None:
    config = with_overrides(config, {"train.steps": int(steps)})
  return train_lib.run(config, workdir, allow_config_change=allow_config_change)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (its config.json), with the keys flowjax added since
  at their defaults."""
  path = storage.join(workdir, "config.json")
  if not storage.exists(path):
    raise FileNotFoundError(f"{path} does not exist; {workdir!r} is not a flowjax workdir "
                            "(train one with api.train or python -m flowjax.main).")
  return config_lib.with_defaults(config_lib.from_json(storage.read_text(path)))


@dataclasses.dataclass
class Trained:
  """A restored workdir: `setup` (mesh, objective, jitted steps) and the restored `state`."""
  workdir: str
  config: ml_collections.ConfigDict
  setup: train_lib.Setup
  state: object
  _samplers: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def step(self) -> int:
    return int(self.state.step)

  def sampler(self, num: int, num_steps: int | None = None, method: str | None = None,
              guidance: float | None = None, times=None):
    """A jitted (params, rng, cond) -> [num, ...] sampler; unset arguments come from
    config.sample (its times only while num_steps is unset too: a step count given here
    samples on the objective's own grid). Compiled once per distinct argument set."""
    sample_config = self.config.sample
    args = dict(num_steps=sample_config.num_steps if num_steps is None else int(num_steps),
                method=sample_config.method if method is None else method,
                guidance=sample_config.guidance if guidance is None else float(guidance))
    if times is None and num_steps is None:
      times = sample_config.get("times", ())
    if times:
      args["times"] = tuple(float(t) for t in times)
      if num_steps is None:
        args["num_steps"] = len(args["times"]) - 1
    key = (int(num),) + tuple(sorted(args.items()))
    if key not in self._samplers:
      self._samplers[key] = train_lib.sample_fn(self.setup, int(num), **args)
    return self._samplers[key]

  def sample(self, num: int = 16, *, num_steps: int | None = None, method: str | None = None,
             guidance: float | None = None, seed: int = 0, labels=None,
             use_ema: bool | None = None, times=None, prompts=None) -> np.ndarray:
    """num samples as numpy [num, ...] (images in [-1, 1], or points for toy2d).

    labels: [num] class labels for a conditional model (default: 0, 1, ..., cycling);
    prompts: captions of a text model, cycling over the samples (default: the data's sample
      prompts, cycling);
    use_ema: sample with the configured EMA (default config.sample.use_ema);
    times: explicit sampling times from noise to data (see config.sample.times), for the
    objectives that take them.
    """
    info = self.setup.info
    if prompts is not None:
      if info.text is None or labels is not None:
        raise ValueError("prompts are read by a text model (data.text.encoder set), instead of "
                         "labels.")
      prompts = [prompts] if isinstance(prompts, str) else list(prompts)
      if not 1 <= len(prompts) <= num:
        raise ValueError(f"{len(prompts)} prompts for {num} samples: give 1 to num prompts "
                         "(they cycle over the samples).")
      features = info.text.encode(prompts)
      labels = features[np.arange(num) % len(prompts)]
    elif labels is None:
      labels = train_lib.sample_labels(info, num)
    elif info.num_classes > 0:
      labels = np.asarray(labels, np.int32).reshape(num)
    elif info.text is not None:
      raise ValueError("labels were given, but this model reads captions: pass prompts=[...] "
                       "instead.")
    else:
      raise ValueError("labels were given, but this model is unconditional (data.conditional="
                       "False); call sample() without labels.")
    use_ema = self.config.sample.use_ema if use_ema is None else use_ema
    params = train_lib.sampling_params(self.state, self.config, use_ema)
    with train_lib.context(self.setup):
      sample = self.sampler(num, num_steps, method, guidance, times)
      out = sample(params, jax.random.key(seed), labels)
    return np.asarray(jax.device_get(out))

  def evaluate(self) -> dict:
    """The objective's loss and metrics on config.eval.split, as `--mode=eval` computes them
    (also written to WORKDIR/eval/step_N.json)."""
    writer = metrics.Writer(self.workdir, enabled=jax.process_index() == 0)
    try:
      return train_lib.evaluate(self.setup, self.state, self.step, self.workdir, writer)
    finally:
      writer.close()


def load(workdir: str, config: ml_collections.ConfigDict | None = None) -> Trained:
  """The newest good checkpoint of `workdir` on this process's devices; the config defaults to
  the workdir's own config.json."""
  from flowjax import modes
  config = config if config is not None else read_config(workdir)
  setup, state = modes.load(config, workdir)
  return Trained(workdir, config, setup, state)


def show(samples: np.ndarray, columns: int | None = None):
  """A PIL image of samples: an image grid (`columns` wide), or a density plot of 2-D points.
  A notebook displays the returned image inline."""
  from PIL import Image
  samples = np.asarray(samples)
  if columns is None or samples.ndim == 2:
    return Image.fromarray(metrics.samples_picture(samples))
  return Image.fromarray(metrics.image_grid(samples, columns))


def compare(samples_by_title: dict, columns: int | None = None):
  """A matplotlib figure with one panel per {title: samples}, e.g. 1 step against 64 steps."""
  plt = plot.pyplot()
  fig, axes = plt.subplots(1, len(samples_by_title), figsize=(3.2 * len(samples_by_title), 3.4),
                           dpi=100, squeeze=False)
  for ax, (title, samples) in zip(axes.flat, samples_by_title.items()):
    ax.imshow(show(samples, columns))
    ax.set_title(title)
    ax.axis("off")
  fig.tight_layout()
  return fig


def curves(workdir: str, keys=None):
  """A matplotlib figure of the workdir's logged metrics (one panel each, or just `keys`)."""
  return plot.metrics_figure(workdir, keys)
