"""REPA, representation alignment (Yu, Kwak, Jang, Jeong, Huang, Shin and Xie, arXiv:2410.06940):
an option (config.repa) of every continuous objective with a DiT, imf_dit or U-Net backbone.

The backbone's hidden tokens h_n after block repa.depth of its training forward go through a
trainable projector h_phi (a 3-layer MLP with SiLU, `layers.RepaProjector`), and are pulled
towards the patch features y_n of a frozen encoder on the clean image x:

  loss_REPA = -1/B sum_b 1/N sum_n cos(y_bn, h_phi(h_bn)),   total = loss + repa.weight loss_REPA,

both vectors normalised over the feature axis as torch's F.normalize does (x / max(||x||, 1e-12)),
with y under stop-gradient (the official code, sihyun-yu/REPA: `loss.py` `SILoss` for the
projection loss, which with several encoders also averages over them; `models/sit.py` for the
projector `build_mlp` on the tokens after block `encoder_depth`; `train.py` for the defaults
proj_coeff 0.5, encoder_depth 8, projector_dim 2048 and the DINOv2 input: ImageNet normalisation,
then a bicubic resize to 224). flowjax aligns with one encoder.

Encoders (ENCODERS, found by repa.encoder):
- 'digits': the committed digits classifier (`flowjax.evals.digits`, repa.encoder_path '' for
  the committed file), its last spatial map before the dense layers (`feature_map`): 4 x 4
  tokens of width 32 of the image taken to 8x8x1 (bilinear resize, channels averaged);
- 'dinov2': DINOv2 (`flowjax.models.dinov2`) from repa.encoder_path, its normalised patch tokens
  (REPA's `x_norm_patchtokens`) at repa.encoder_resolution.
Where the encoder's token grid differs from the backbone's (REPA's ImageNet setup has them equal:
(224 / 14)^2 = (32 / 2)^2 = 256), the encoder features are resized to the backbone's grid,
bilinearly with antialiasing (`jax.image.resize`, 'linear': a triangle filter widened by the
scale factor when the encoder's grid is the finer one).

Encoder parameters (repa.features='online') live in TrainState.extra["repa_encoder"], like the
teachers of CTM and sCD: initialised as zeros of their shapes, read from disk by the objective's
`load_extra` on a fresh start, passed into the jitted step as arrays (never HLO constants),
sharded by the logical-axis rules where they carry logical names (replicated otherwise), never
trained, and saved with every checkpoint (DINOv2 ViT-B adds 0.35 GB to each, ViT-L 1.2 GB).
repa.features='cached' reads the features from batch['repa_features'] instead ([B, N, D] on a
square grid; no encoder in the state, the projector's width from the data): latent caches
written by `python -m flowjax.data.cache_latents --repa_encoder=...` hold them, the encoder's
patch tokens of each cached image (flowjax/data/latents.py), and the config check accepts them
where the cache's encoder is config.repa's (encoder, encoder_resolution, encoder_path; '' takes
the cache's). REPA's official code runs the encoder on the raw images in every step, also when
it trains on latents (`train.py`); caching its output is flowjax's choice, which needs neither
images nor encoder in the train step.

The projector belongs to the backbone's parameters (params["repa_projector"]), so a checkpoint
trained with REPA keeps it; sampling never runs it, and distillation (CTM, sCD, sCM's
init_from_teacher) reads a flow-matching teacher trained with REPA without it.
"""

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from flowjax import config as config_lib, storage
from flowjax.models import layers
from flowjax.registry import OBJECTIVES, Registry, unknown_name_message

# config.repa's keys at their defaults; weight 0 is off.
DEFAULTS = config_lib.base_config().repa.to_dict()
FEATURES = ("online", "cached")
# Backbones with hidden tokens to align (a repa_depth field).
MODELS = ("dit", "imf_dit", "unet")
EXTRA_KEY = "repa_encoder"
BATCH_KEY = "repa_features"
# The metric holding the objective's loss without the REPA term (the logged `error` of an
# objective that has no ERROR_METRIC of its own, e.g. flow matching's MSE).
UNALIGNED_LOSS = "loss_without_repa"
NORMALIZE_EPS = 1e-12

ENCODERS = Registry("REPA encoder")


def objective_names() -> list[str]:
  """The objectives that take config.repa: those with a `repa` field."""
  return [name for name in OBJECTIVES.names()
          if "repa" in {f.name for f in dataclasses.fields(OBJECTIVES.get(name))}]


def enabled(repa_config) -> bool:
  """Whether config.repa (None or a section of a config written before it existed: off) asks
  for REPA."""
  return repa_config is not None and float(repa_config.get("weight", 0.0)) > 0.0


def check_config(config) -> None:
  """Raises ValueError naming the config.repa key and the fix when REPA cannot run as set."""
  repa_config = config.get("repa")
  if repa_config is None:
    return
  weight = repa_config.get("weight", 0.0)
  if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight >= 0:
    raise ValueError(f"config.repa.weight={weight!r} must be a number >= 0 (0 = off; REPA's "
                     "0.5).")
  features = repa_config.get("features", "online")
  if features not in FEATURES:
    raise ValueError("config.repa.features: " + unknown_name_message("value", str(features),
                                                                     list(FEATURES)))
  if not enabled(repa_config):
    return
  encoder = repa_config.get("encoder", "")
  if not encoder:
    raise ValueError(f"config.repa.weight={weight} turns REPA on, but config.repa.encoder is "
                     "empty; set --config.repa.encoder=digits (the committed digits "
                     "classifier) or --config.repa.encoder=dinov2 with "
                     "--config.repa.encoder_path=<DINOv2 checkpoint>, or weight=0 for no REPA.")
  if encoder not in ENCODERS:
    raise ValueError("config.repa.encoder: " + unknown_name_message(
        "REPA encoder", str(encoder), ENCODERS.names()))
  for key in ("depth", "projector_dim", "encoder_resolution"):
    value = repa_config.get(key, DEFAULTS[key])
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"config.repa.{key}={value!r} must be a positive integer (REPA: "
                       f"{DEFAULTS[key]}).")
  supported = objective_names()
  if config.objective.name not in supported:
    raise ValueError(f"config.repa.weight={weight}: objective {config.objective.name!r} has no "
                     "denoiser forward whose hidden tokens REPA could align; REPA works with "
                     f"the objectives {', '.join(supported)}. Set --config.repa.weight=0.")
  if config.model.name not in MODELS:
    raise ValueError(f"config.repa.weight={weight}: model.name={config.model.name!r} has no "
                     "hidden tokens REPA could align; use a backbone among "
                     f"{', '.join(MODELS)}, or --config.repa.weight=0.")
  data_name = str(config.data.get("name", ""))
  if features == "online" and data_name.startswith("latents:"):
    raise ValueError(f"config.repa.features='online' encodes batch['image'], but "
                     f"data.name={data_name!r} holds autoencoder latents, not the images REPA's "
                     "encoder reads; train with REPA on an image dataset, or set "
                     "--config.repa.weight=0.")
  if features == "cached":
    if not data_name.startswith("latents:"):
      raise ValueError(f"config.repa.features='cached' reads batch['{BATCH_KEY}'], which "
                       f"data.name={data_name!r} does not provide (only latent caches written by "
                       "python -m flowjax.data.cache_latents --repa_encoder=... hold REPA "
                       "features); use --config.repa.features=online.")
    splits = ["train"] + ([config.eval.split] if config.get("eval") and
                          config.eval.get("every_steps", 0) else [])
    for split in splits:
      check_cached_features(repa_config, data_name, split)


def check_cached_features(repa_config, data_name: str, split: str) -> None:
  """Raises ValueError naming the cache_latents command that writes them unless the latent cache
  data.name='latents:<DIR>' holds, for `split`, the features of config.repa's encoder: the same
  repa.encoder, repa.encoder_resolution (for encoders that take one) and repa.encoder_path (''
  takes the cache's). A split that is not cached is left to the data source to report."""
  from flowjax.data import latents
  root = latents.directory(data_name)
  try:
    spec, _ = latents.read_split(root, split)
  except FileNotFoundError:
    return
  name = repa_config.get("encoder", "")
  resolution = repa_config.get("encoder_resolution", DEFAULTS["encoder_resolution"])
  path = repa_config.get("encoder_path", "")
  command = latents.repa_command(split, name, path, resolution)
  stored = spec.get("repa")
  where = f"the latent cache {root} (split {split!r})"
  if stored is None:
    raise ValueError(f"config.repa.features='cached' reads the REPA features stored with the "
                     f"latents, but {where} holds none; write a cache with them: {command}; or "
                     "set --config.repa.weight=0.")
  mismatch = []
  if stored["encoder"] != name:
    mismatch.append(f"repa.encoder={stored['encoder']!r}, not {name!r}")
  else:
    if stored["encoder_resolution"] not in (None, resolution):
      mismatch.append(f"repa.encoder_resolution={stored['encoder_resolution']}, not "
                      f"{resolution}")
    if path and storage.absolute(path) != stored["encoder_path"]:
      mismatch.append(f"repa.encoder_path={stored['encoder_path']!r}, not {path!r}")
  if mismatch:
    raise ValueError(f"config.repa.features='cached': {where} holds the features of another "
                     f"encoder ({'; '.join(mismatch)}). Set config.repa to the cache's encoder "
                     f"(encoder_path '' takes the cache's), or write a cache with this one: "
                     f"{command}")


# Encoders.

@dataclasses.dataclass(frozen=True, eq=False)
class Encoder:
  """A frozen feature encoder.

  name: its repa.encoder name; load: () -> parameters (a pytree of host arrays, read once);
  tokens: (params, images [B, H, W, C] in [-1, 1]) -> patch features [B, h, w, D] float32;
  path: the weights it reads; resolution: the input side it resizes images to, None if it takes
  no repa.encoder_resolution.
  """
  name: str
  load: Callable[[], Any]
  tokens: Callable[[Any, jax.Array], jax.Array]
  path: str = ""
  resolution: int | None = None

  @functools.cached_property
  def host_params(self):
    return jax.tree.map(np.asarray, self.load())

  def abstract_params(self):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.host_params)

  def feature_shape(self, image_shape) -> tuple[int, int, int]:
    """(h, w, D) of the features of images of per-example shape (H, W, C)."""
    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    return tuple(jax.eval_shape(self.tokens, self.abstract_params(), images).shape[1:])


@functools.cache
def encoder(name: str, path: str = "", resolution: int = DEFAULTS["encoder_resolution"]):
  """The Encoder named `name` (ENCODERS) for its weights at `path` ('' = its default) and input
  side `resolution` (encoders that resize their input); one per arguments."""
  return ENCODERS.get(name)(path, resolution)


@ENCODERS.register("digits")
def digits_encoder(path: str, resolution: int) -> Encoder:
  """The committed digits classifier (`flowjax.evals.digits`): images [B, H, W, 1 or 3] in
  [-1, 1], channels averaged and resized bilinearly to 8x8 (as flowjax.evals.digits scores
  samples of other sizes), -> its last spatial map [B, 4, 4, 32]. `resolution` is unused."""
  del resolution
  from flowjax.evals import digits
  module = digits.DigitsClassifier()
  file = path or digits.DEFAULT_PATH

  def load():
    try:
      return digits.load_classifier(file).params
    except digits.AssetError as error:
      raise ValueError(f"config.repa.encoder_path={path!r}: {error}") from error

  def tokens(params, images):
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"repa.encoder='digits' reads images [B, H, W, 1 or 3] in [-1, 1]; got "
                       f"shape {tuple(images.shape)}. Use an encoder for these data.")
    images = jnp.mean(images.astype(jnp.float32), axis=-1, keepdims=True)
    size = digits.IMAGE_SHAPE[:2]
    if images.shape[1:3] != size:
      images = jax.image.resize(images, (images.shape[0], *size, 1), "linear")
    return module.apply({"params": params}, images, method=digits.DigitsClassifier.feature_map)

  return Encoder("digits", load, tokens, file)


@ENCODERS.register("dinov2")
def dinov2_encoder(path: str, resolution: int) -> Encoder:
  """DINOv2 (`flowjax.models.dinov2`) from `path` as REPA runs it at `resolution`
  (`dinov2.for_resolution`): images [B, H, W, 1 or 3] in [-1, 1] -> its final-norm patch tokens
  on the (resolution / 14)^2 grid (`dinov2.patch_tokens`: ImageNet normalisation, bicubic resize
  to `resolution`)."""
  if not path:
    raise ValueError("config.repa.encoder='dinov2' needs --config.repa.encoder_path=<DINOv2 "
                     "checkpoint> (a HuggingFace folder such as facebook/dinov2-base, or a "
                     "weights file; see flowjax.models.dinov2.load).")
  from flowjax.models import dinov2

  @functools.cache
  def loaded():
    try:
      config, _, params = dinov2.load(path)
    except (OSError, ValueError) as error:
      raise ValueError(f"config.repa.encoder_path={path!r}: {error}") from error
    _, module, params = dinov2.for_resolution(config, params, resolution)
    # Host copies: the cached weights must not hold a device copy beside the state's.
    return module, jax.tree.map(np.asarray, params)

  def tokens(params, images):
    out = dinov2.patch_tokens(loaded()[0], params, images, resolution)
    side = math.isqrt(out.shape[1])
    return out.reshape(out.shape[0], side, side, out.shape[2]).astype(jnp.float32)

  return Encoder("dinov2", lambda: loaded()[1], tokens, path, resolution)


# The alignment an objective applies.

@dataclasses.dataclass(frozen=True, eq=False)
class Alignment:
  """REPA as an objective applies it: weight lambda, and where the features come from
  (`encoder` for features='online', None for 'cached')."""
  weight: float
  encoder: Encoder | None

  def init_extra(self) -> dict:
    """{EXTRA_KEY: zeros shaped like the encoder's parameters} (online features), else {}."""
    if self.encoder is None:
      return {}
    return {EXTRA_KEY: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                    self.encoder.abstract_params())}

  def load_extra(self, abstract_extra) -> dict:
    """{EXTRA_KEY: the encoder's parameters} placed on the shardings of
    abstract_extra[EXTRA_KEY] (each process holds the whole file), else {}."""
    if self.encoder is None:
      return {}
    place = lambda host, abstract: jax.make_array_from_callback(
        host.shape, abstract.sharding, lambda index: host[index])
    return {EXTRA_KEY: jax.tree.map(place, self.encoder.host_params, abstract_extra[EXTRA_KEY])}

  def target(self, batch, view) -> jax.Array:
    """y: the encoder features of the clean images [B, h, w, D] float32 under stop-gradient, from
    the encoder in view["extra"] or batch['repa_features'] ([B, N, D] on a square grid)."""
    if self.encoder is None:
      features = jnp.asarray(batch[BATCH_KEY], jnp.float32)
      side = math.isqrt(features.shape[1])
      if side * side != features.shape[1]:
        raise ValueError(f"batch['{BATCH_KEY}'] has {features.shape[1]} tokens, not a square "
                         "grid; cache the features of a square grid of patches.")
      features = features.reshape(features.shape[0], side, side, features.shape[2])
    else:
      features = self.encoder.tokens(view["extra"][EXTRA_KEY], batch["image"])
    return jax.lax.stop_gradient(features.astype(jnp.float32))

  def add(self, loss, metrics: dict, tokens, target):
    """(loss + weight loss_REPA, metrics with repa_cos and UNALIGNED_LOSS, the objective's own
    loss) for the backbone's projected tokens [B, h, w, D] and the target features
    [B, h', w', D] (resized to h x w when they differ)."""
    term, cos = alignment_loss(tokens, match_grid(target, tokens.shape[1:3]))
    return loss + self.weight * term, dict(metrics, repa_cos=cos, **{UNALIGNED_LOSS: loss})


def match_grid(features, grid) -> jax.Array:
  """features [B, h', w', D] on the grid (h, w): unchanged when equal, else resized bilinearly
  with antialiasing (see the module docstring)."""
  if tuple(features.shape[1:3]) == tuple(grid):
    return features
  return jax.image.resize(features, (features.shape[0], *grid, features.shape[3]), "linear")


def alignment_loss(tokens, features):
  """(loss_REPA, mean cosine): -1/B sum_b 1/N sum_n cos(y_bn, z_bn) for tokens z and features y,
  [B, ..., D] each (the same shape), with F.normalize's x / max(||x||, 1e-12) over D; float32
  scalars (sihyun-yu/REPA `loss.py`)."""
  if tokens.shape != features.shape:
    raise ValueError(f"REPA compares the projected tokens {tuple(tokens.shape)} with encoder "
                     f"features of the same shape; got {tuple(features.shape)}.")
  normalize = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True),
                                        NORMALIZE_EPS)
  z = normalize(tokens.astype(jnp.float32))
  y = normalize(features.astype(jnp.float32))
  cos = jnp.mean(jnp.reshape(jnp.sum(z * y, axis=-1), (tokens.shape[0], -1)), axis=1)
  return -jnp.mean(cos), jnp.mean(cos)


def setup(repa_config, objective_name: str, model, info):
  """(Alignment, backbone with REPA's projector) for config.repa, or (None, model) when it is
  off. Raises ValueError naming the key when the objective or the backbone cannot take REPA."""
  if not enabled(repa_config):
    return None, model
  if objective_name not in objective_names():
    raise ValueError(f"config.repa.weight={repa_config.weight}: objective {objective_name!r} "
                     "has no denoiser forward whose hidden tokens REPA could align; REPA works "
                     f"with the objectives {', '.join(objective_names())}.")
  if not hasattr(model, "repa_depth"):
    raise ValueError(f"config.repa.weight={repa_config.weight}: the {type(model).__name__} "
                     "backbone has no hidden tokens REPA could align; use a backbone among "
                     f"{', '.join(MODELS)}.")
  layers.check_repa_depth(int(repa_config.depth), model.repa_blocks)
  if repa_config.encoder not in ENCODERS:
    raise ValueError("config.repa.encoder: " + unknown_name_message(
        "REPA encoder", str(repa_config.encoder), ENCODERS.names()))
  if repa_config.get("features", "online") == "cached":
    found, stored = None, info.extra_array(BATCH_KEY)
    if stored is None:
      from flowjax.data import latents
      raise ValueError(f"config.repa.features='cached' reads batch['{BATCH_KEY}'], which these "
                       "data do not provide; write a latent cache with REPA features: "
                       f"{latents.repa_command('train')}, or use --config.repa.features=online.")
    dim = stored[0][-1]
  else:
    found = encoder(repa_config.encoder, repa_config.get("encoder_path", ""),
                    int(repa_config.get("encoder_resolution", DEFAULTS["encoder_resolution"])))
    dim = found.feature_shape(tuple(info.image_shape))[-1]
  model = model.clone(repa_depth=int(repa_config.depth), repa_dim=int(dim),
                      repa_projector_dim=int(repa_config.get("projector_dim",
                                                               DEFAULTS["projector_dim"])))
  return Alignment(float(repa_config.weight), found), model


# The helpers the objectives call; each is the identity (or None) without REPA.

def init_extra(alignment: Alignment | None, extra: dict) -> dict:
  """The objective's own `extra` with the encoder's placeholder parameters added."""
  return extra if alignment is None else {**extra, **alignment.init_extra()}


def load_extra(alignment: Alignment | None, abstract_extra, loaded: dict) -> dict:
  """`loaded` (what the objective read itself) with the encoder's parameters added."""
  return loaded if alignment is None else {**loaded, **alignment.load_extra(abstract_extra)}


def target(alignment: Alignment | None, batch, view):
  """The encoder features of the batch (Alignment.target), or None without REPA."""
  return None if alignment is None else alignment.target(batch, view)
