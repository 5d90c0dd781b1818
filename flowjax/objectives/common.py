"""Pieces every objective uses: model application, label dropout, time samplers, noise draws."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from flowjax.models import layers


# The metrics key under which an objective's loss returns new values for entries of
# state.extra it keeps across steps (f-distill's running mean of the density ratio): the train
# step takes them out of the metrics and writes them into state.extra (kept on a skipped,
# non-finite step; averaged over gradient-accumulation microbatches); evaluations drop them.
EXTRA_UPDATES = "extra_updates"


def apply_model(model, params, x, times, cond, rng=None, train=False, capture=False):
  """Runs the backbone; `rng` feeds dropout when `train`.

  capture=True (REPA, `flowjax.objectives.repa`): returns (output, tokens), tokens the
  projected hidden tokens [B, h, w, D] float32 the backbone sows when built with repa_depth > 0.
  """
  rngs = {"dropout": rng} if (train and rng is not None) else {}
  if not capture:
    return model.apply({"params": params}, x, times, cond, train=train, rngs=rngs)
  out, state = model.apply({"params": params}, x, times, cond, train=train, rngs=rngs,
                           mutable=[layers.REPA_COLLECTION])
  sown = state.get(layers.REPA_COLLECTION, {}).get(layers.REPA_NAME)
  if not sown:
    raise ValueError(f"{type(model).__name__} sowed no REPA tokens: it was built without "
                     "repa_depth; REPA backbones are made by flowjax.objectives.repa from "
                     "config.repa.")
  return out, sown[0]


def init_model(model, rng, x, num_times: int, cond):
  """Boxed parameters of `model` for inputs like `x` with `num_times` time arrays."""
  times = tuple(jnp.zeros((x.shape[0],), jnp.float32) for _ in range(num_times))
  params_key, dropout_key = jax.random.split(rng)
  return model.init({"params": params_key, "dropout": dropout_key}, x, times, cond,
                    train=False)["params"]


def labels(batch, num_classes: int):
  return batch["label"] if num_classes > 0 else None


TEXT_KEY = "text"  # a captioned batch's caption features (flowjax.data.captions.KEY)


def text_null(model, info):
  """The null (empty) caption's features [T, D] float32 for a text model (`model.text_dim` > 0)
  on captioned data, None for a model without text; a ValueError naming the fix when the model
  and the data's captions do not meet."""
  text_dim = int(getattr(model, "text_dim", 0) or 0)
  if not text_dim:
    return None
  text_length = int(getattr(model, "text_length", 0))
  if getattr(info, "text", None) is None:
    raise ValueError(
        f"model.text_dim={text_dim}: a text-to-image model trains on captions; set "
        "data.text.encoder (and a captioned data.name: digits, folder:<DIR> with captions, a "
        "latent cache of one, or synthetic for a dry run), or model.text_dim=0 and "
        "model.text_length=0.")
  if tuple(info.text.shape) != (text_length, text_dim):
    raise ValueError(
        f"model.text_length={text_length} and model.text_dim={text_dim} must equal the caption "
        f"features' shape {tuple(info.text.shape)} (data.text.max_length and the encoder's "
        "width).")
  return np.asarray(info.text.null(), np.float32)


def condition(batch, num_classes: int, null_text=None):
  """A batch's condition: caption features [B, T, D] (a text model: null_text set), labels [B]
  (num_classes > 0) or None."""
  if null_text is not None:
    return batch[TEXT_KEY]
  return labels(batch, num_classes)


def null_condition(num_classes: int, null_text=None):
  """The null condition: the null caption's features, or the null label index."""
  return num_classes if null_text is None else null_text


def null_like(cond, null):
  """cond's null: the null label index or caption features broadcast to cond's shape."""
  return jnp.broadcast_to(jnp.asarray(null, cond.dtype), cond.shape)


def is_null(cond, null):
  """[B] bool: which examples' condition is the null one (label index or caption features)."""
  same = cond == jnp.asarray(null, cond.dtype)
  return same if cond.ndim == 1 else jnp.all(same.reshape(cond.shape[0], -1), axis=1)


def drop_condition(cond, rng, rate: float, num_classes: int, null_text=None):
  """cond with each example's label (or caption) replaced by the null one with probability
  `rate`."""
  if null_text is None:
    return drop_labels(cond, rng, rate, num_classes)
  if rate <= 0:
    return cond
  drop = jax.random.bernoulli(rng, rate, (cond.shape[0],))
  return jnp.where(drop[:, None, None], null_like(cond, null_text), cond)


class Conditioned:
  """The condition handling of an objective with `num_classes`, `label_dropout` and `null_text`
  fields (labels, captions or none): one place for what each condition-reading objective does
  with its batch's labels or caption features."""

  def condition(self, batch):
    """The batch's caption features [B, T, D] (a text model), labels [B] (class-conditional) or
    None."""
    return condition(batch, self.num_classes, self.null_text)

  def drop_condition(self, cond, rng):
    """cond with each example's caption (or label) replaced by the null one with probability
    label_dropout."""
    return drop_condition(cond, rng, self.label_dropout, self.num_classes, self.null_text)

  @property
  def null(self):
    """The null condition: the null label index, or the null caption's features [T, D]."""
    return null_condition(self.num_classes, self.null_text)

  @property
  def conditional(self) -> bool:
    """Whether the model reads class labels or captions (what guidance contrasts with null)."""
    return self.num_classes > 0 or self.null_text is not None


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


# The noise laws of `draw_noise` (config key objective.noise) and the default degrees of freedom
# of the Student-t law (objective.noise_nu; 10, as the t-EDM losses of NVIDIA/physicsnemo).
NOISES = ("gaussian", "student_t")
DEFAULT_NU = 10.0
# The keys every noise-drawing objective adds to its DEFAULTS.
NOISE_DEFAULTS = dict(noise="gaussian", noise_nu=DEFAULT_NU)


def check_noise(noise: str, nu) -> None:
  """Raises ValueError naming objective.noise / objective.noise_nu when they cannot work.

  Student-t noise needs finite nu > 2, so that its variance nu / (nu - 2) per dimension is finite
  (t-EDM of Pandey et al., arXiv:2410.14171, scales sigma by sqrt(nu / (nu - 2)); NVIDIA/
  physicsnemo's t-EDM rejects nu <= 2 likewise). nu is read only when noise='student_t'."""
  if noise not in NOISES:
    from flowjax.registry import unknown_name_message
    raise ValueError("objective.noise: " + unknown_name_message("noise", noise, list(NOISES)))
  if noise != "student_t":
    return
  is_number = isinstance(nu, (int, float)) and not isinstance(nu, bool)
  if not (is_number and math.isfinite(nu) and nu > 2):
    raise ValueError(f"objective.noise_nu={nu!r}: Student-t noise needs finite degrees of "
                     "freedom nu > 2 (its variance per dimension is nu / (nu - 2)); smaller nu "
                     "gives heavier tails (e.g. 3 to 10), and objective.noise='gaussian' is the "
                     "nu -> infinity limit.")


def effective_sigma(sigma, noise: str, nu):
  """The standard deviation per dimension of sigma eps for eps of `draw_noise`'s law: sigma itself
  (the same object) for "gaussian", sigma sqrt(nu / (nu - 2)) for "student_t". sigma: an array
  or a float.

  t-EDM (Pandey et al., arXiv:2410.14171) evaluates EDM's preconditioning at this scale: NVIDIA/
  physicsnemo's tEDMPrecondSuperRes.forward multiplies sigma by sqrt(nu / (nu - 2)) before EDM's
  c_skip, c_out, c_in and c_noise = ln(sigma) / 4, and its tEDMResidualLoss evaluates EDM's loss
  weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 there too."""
  if noise != "student_t":
    return sigma
  return sigma * math.sqrt(nu / (nu - 2))


def draw_noise(rng, shape, kind: str = "gaussian", nu: float = DEFAULT_NU, dtype=None):
  """Noise eps: `shape` = [B, ...], one independent draw per example (axis 0).

  "gaussian": eps = jax.random.normal(rng, shape, dtype), exactly the draw every objective made
  before the noise option existed (same key, same values).
  "student_t": the multivariate Student-t t_D(0, I_D, nu) of Pandey et al. (arXiv:2410.14171) over
  each example's D = prod(shape[1:]) dimensions, as a Gaussian scale mixture: eps = n /
  sqrt(kappa) with n = jax.random.normal(rng, shape, dtype) (the Gaussian draw above) and ONE
  kappa ~ chi^2(nu) / nu per example, shared by all its dimensions (drawn from
  fold_in(rng, 1)). Each dimension is then Student-t with nu degrees of freedom (variance
  nu / (nu - 2), not 1) and ||eps||^2 / D ~ F(D, nu). As nu grows kappa -> 1, so the draw
  converges to the Gaussian draw of the same key, value by value.
  """
  n = jax.random.normal(rng, shape, dtype)
  if kind == "gaussian":
    return n
  if kind != "student_t":
    from flowjax.registry import unknown_name_message
    raise ValueError("objective.noise: " + unknown_name_message("noise", kind, list(NOISES)))
  kappa = jax.random.chisquare(jax.random.fold_in(rng, 1), nu, (shape[0],), jnp.float32) / nu
  scale = jax.lax.rsqrt(kappa).astype(n.dtype)
  return n * jnp.reshape(scale, (shape[0],) + (1,) * (len(shape) - 1))


# objective.target_ema: the current parameters under stop-gradient (an EMA of rate 0).
CURRENT_PARAMS = "current"


def ema_target(params, view, target_ema: str, objective: str, example: str):
  """The parameters an objective builds its targets from, under stop-gradient: the EMA of
  optim.ema_decays named by `target_ema` (its key, e.g. "0.99"; "" takes the only one kept),
  or `params` itself for CURRENT_PARAMS. view: the step's {"ema": {...}, ...}. Errors name the
  objective and `example`, a setting that works (e.g. "(0.9999, 0.99) with
  objective.target_ema='0.99'")."""
  if target_ema == CURRENT_PARAMS:
    return jax.lax.stop_gradient(params)
  ema = (view or {}).get("ema") or {}
  if not ema:
    raise ValueError(f"objective '{objective}' builds its targets from an EMA of the parameters, "
                     f"but the trainer keeps none; set optim.ema_decays (e.g. {example}) or "
                     f"objective.target_ema='{CURRENT_PARAMS}'.")
  if not target_ema and len(ema) > 1:
    # A pytree's dict keys come back sorted, so "the first" of several would not be the first
    # listed in optim.ema_decays: the choice must be explicit.
    raise ValueError(f"optim.ema_decays has several decays {sorted(ema)}; set "
                     f"objective.target_ema to the one {objective}'s targets use.")
  key = target_ema or next(iter(ema))
  if key not in ema:
    raise ValueError(f"objective.target_ema={target_ema!r} is not one of the EMA decays the "
                     f"trainer keeps, {sorted(ema)}; use one of them, '' (the only one) or "
                     f"'{CURRENT_PARAMS}'.")
  return jax.lax.stop_gradient(ema[key])


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
