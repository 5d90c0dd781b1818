"""Pieces every objective uses: model application, label dropout, time samplers."""

import jax
import jax.numpy as jnp


def apply_model(model, params, x, times, cond, rng=None, train=False):
  """Runs the backbone; `rng` feeds dropout when `train`."""
  rngs = {"dropout": rng} if (train and rng is not None) else {}
  return model.apply({"params": params}, x, times, cond, train=train, rngs=rngs)


def init_model(model, rng, x, num_times: int, cond):
  """Boxed parameters of `model` for inputs like `x` with `num_times` time arrays."""
  times = tuple(jnp.zeros((x.shape[0],), jnp.float32) for _ in range(num_times))
  params_key, dropout_key = jax.random.split(rng)
  return model.init({"params": params_key, "dropout": dropout_key}, x, times, cond,
                    train=False)["params"]


def labels(batch, num_classes: int):
  return batch["label"] if num_classes > 0 else None


def drop_labels(cond, rng, rate: float, num_classes: int):
  """Replaces each label by the null label (index num_classes) with probability `rate`."""
  if cond is None or rate <= 0:
    return cond
  drop = jax.random.bernoulli(rng, rate, cond.shape)
  return jnp.where(drop, num_classes, cond)


def sample_time(rng, shape, sampler: str, mean: float = 0.0, std: float = 1.0):
  """t in (0, 1): "uniform" or "logit_normal" (t = sigmoid(mean + std n))."""
  if sampler == "uniform":
    return jax.random.uniform(rng, shape)
  if sampler == "logit_normal":
    return jax.nn.sigmoid(mean + std * jax.random.normal(rng, shape))
  from flowjax.registry import unknown_name_message
  raise ValueError(unknown_name_message("time sampler", sampler, ["uniform", "logit_normal"]))


def mean_per_example(x):
  """[B, ...] -> [B] mean over all but the first axis."""
  return jnp.mean(jnp.reshape(x, (x.shape[0], -1)), axis=1)


def grid_times(times, num_steps: int, end: str) -> tuple[float, ...]:
  """sample.times checked for a sampler that ends on the data: num_steps + 1 strictly decreasing
  flowjax times in [0, 1] whose last is 0 (`end` says what 0 means to the sampler). Returns them
  as floats; raises ValueError naming the rule otherwise."""
  times = tuple(float(u) for u in times)
  if (len(times) != num_steps + 1 or times[-1] != 0.0 or times[0] > 1.0
      or not all(a > b for a, b in zip(times, times[1:]))):
    raise ValueError(f"sample.times={times}: give num_steps + 1 = {num_steps + 1} decreasing "
                     f"times in [0, 1] ending at 0 ({end}).")
  return times
