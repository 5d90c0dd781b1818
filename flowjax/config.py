"""The one config schema: defaults shared by every experiment, validation and fingerprints.

An experiment file (`experiments/*.py`) defines `get_config(arg=None)` that starts from
`base_config()`, fills in its sections and returns the locked ConfigDict. `validate` runs before
anything is compiled and turns every bad value into one error that names the key and the fix.
"""

import hashlib
import json
import os
from typing import Any

import ml_collections

SECTIONS = ("objective", "model", "data", "mesh", "sharding", "optim", "train", "ckpt", "eval",
            "sample")

# Keys that may change between a run and its resumption without changing what is trained.
RESUMABLE_KEYS = (
    "train.steps", "train.log_every", "train.dry_run", "train.progress", "train.max_skipped",
    "train.matmul_precision", "train.on_divergence", "train.divergence_factor",
    "train.divergence_warmup", "mesh",
    "ckpt.every_steps", "ckpt.max_to_keep", "ckpt.async_save", "eval", "sample", "data.num_workers",
    "data.prefetch", "data.tfds_data_dir",
)

# train.matmul_precision: how float32 matrix products run. "default" is the backend's choice
# (TensorFloat-32 on NVIDIA GPUs since Ampere, one bfloat16 pass on TPU; exact on CPU); "float32"
# asks for full float32 products (slower on accelerators), "tensorfloat32" and "bfloat16" for
# those explicitly. bfloat16 models are unaffected.
MATMUL_PRECISIONS = ("default", "float32", "tensorfloat32", "bfloat16")

# eval.feature_extractor: the networks flowjax.evals.fid measures FID and precision/recall in.
FEATURE_EXTRACTORS = ("inception", "classifier")

# The logical axes models name (t5x-style); rules map them to mesh axes.
LOGICAL_AXES = ("batch", "length", "embed", "mlp", "heads", "kv", "vocab", "conv_in", "conv_out")

DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("length", None),
    ("vocab", None),
    ("conv_in", None),
    ("conv_out", None),
)

# sharding.preset: complete rule tables; sharding.rules overrides single entries of the preset.
# Each only shards over mesh axes larger than 1, so "fsdp_tensor" on a data-only mesh is pure data
# parallelism; the other presets keep parameters whole along the axes they leave out.
RULE_PRESETS = {
    "fsdp_tensor": DEFAULT_RULES,
    "fsdp": tuple((n, None if n in ("mlp", "heads") else t) for n, t in DEFAULT_RULES),
    "tensor": tuple((n, None if n == "embed" else t) for n, t in DEFAULT_RULES),
    "data_parallel": tuple((n, t if n == "batch" else None) for n, t in DEFAULT_RULES),
}


def resolved_rules(sharding_config) -> tuple:
  """The preset's rule table with sharding.rules' entries replacing those of the same axis."""
  table = dict(RULE_PRESETS[sharding_config.preset])
  for name, target in sharding_config.rules:
    table[name] = tuple(target) if isinstance(target, list) else target
  return tuple(table.items())


def base_config() -> ml_collections.ConfigDict:
  """Every key an experiment may set, with defaults; model/objective sections start empty."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.objective = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict()

  c.data = ml_collections.ConfigDict(dict(
      name="digits", toy_distribution="checkerboard", conditional=False, image_size=8,
      channels=3, num_classes=0, random_flip=False, tfds_data_dir="", num_workers=0,
      prefetch=2))
  # data.name='latents:<DIR>': 'channel' (per-channel standardisation by the cached statistics),
  # 'factor' (times the autoencoder's scaling_factor, 0.18215 for the SD-VAE) or 'none'.
  c.data.latent_scaling = "channel"
  # Captions (flowjax.text): encoder '' (none), 'words' (offline hashed words through a random
  # T5 of width dim), 't5' (a local HF T5 folder at path), 'gemma_embed' (a Gemma's token
  # embedding) or 'gemma' (a Gemma decoder); max_length tokens per caption.
  c.data.text = ml_collections.ConfigDict(dict(
      encoder="", path="", max_length=16, vocab_size=4096, dim=32, layers=2, heads=4, seed=0))
  # data.name='tfds:<NAME>' with captions: the Text feature holding them ('captions/text'), or ''
  # for the first of 'caption', 'captions/text', 'text' the dataset has (flowjax.data.tfds).
  c.data.caption_feature = ""

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding = ml_collections.ConfigDict(dict(preset="fsdp_tensor", rules=()))

  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
      decay_norms_and_biases=False, schedule="constant", warmup_steps=0, final_lr=0.0,
      grad_clip=1.0, ema_decays=(0.999,), ema_start_step=0, ema_every=1))
  # optim.sets.<name>: per-set optimizer keys (lr, b1, ...) of an objective that trains several
  # networks (its PARAM_SETS, e.g. DMD2's generator and fake_score); the rest come from optim.
  c.optim.sets = ml_collections.ConfigDict()

  c.train = ml_collections.ConfigDict(dict(
      steps=1000, batch_size=64, grad_accum_steps=1, log_every=50, dry_run=False,
      nonfinite="stop", max_skipped=20, progress="auto", matmul_precision="default",
      on_divergence="warn", divergence_factor=5.0, divergence_warmup=200))

  c.ckpt = ml_collections.ConfigDict(dict(
      every_steps=500, max_to_keep=3, init_from="", async_save=True))

  # eval.feature_extractor: the features FID and precision/recall are measured in: 'inception'
  # (eval.inception_weights, comparable to published FIDs) or 'classifier' (eval.classifier_weights,
  # a small CNN trained on the data by flowjax.evals.classifier, for comparing runs on that data).
  c.eval = ml_collections.ConfigDict(dict(every_steps=0, num_batches=4, split="test",
                                          inception_weights="", fid_reference="",
                                          fid_num_samples=50_000, feature_extractor="inception",
                                          classifier_weights=""))

  c.sample = ml_collections.ConfigDict(dict(
      every_steps=0, num=64, num_steps=50, method="euler", guidance=1.0, use_ema=True,
      ema_decay=-1.0, times=()))

  # repa: REPA representation alignment (arXiv:2410.06940; flowjax.objectives.repa) for the
  # continuous objectives on a DiT, imf_dit or U-Net: weight (0 = off; REPA's 0.5), depth (the
  # block whose tokens are aligned, 1-based; 8 for SiT-XL/2), encoder ('digits' | 'dinov2'),
  # encoder_path (the DINOv2 checkpoint; '' = the committed digits classifier),
  # encoder_resolution (DINOv2's input side), projector_dim (the projector's hidden width),
  # features ('online': the encoder runs in the train step; 'cached': batch['repa_features']).
  c.repa = ml_collections.ConfigDict(dict(
      weight=0.0, depth=8, encoder="", encoder_path="", encoder_resolution=224,
      projector_dim=2048, features="online"))
  return c


def parameter_sets(config: ml_collections.ConfigDict, names, **per_set) -> None:
  """config.optim.sets for an objective with several networks (its PARAM_SETS `names`): every
  per-set optimizer key (flowjax.optim.SET_KEYS) copied from config.optim as it is now, then the
  dicts of `per_set` (e.g. fake_score=dict(lr=1e-3)) applied. Each key of each set can then be set
  from the command line (--config.optim.sets.fake_score.b1=0.0); these, not config.optim's own,
  are the keys the sets' optimizers use."""
  from flowjax import optim
  unknown = set(per_set) - set(names)
  if unknown:
    raise ValueError(f"parameter_sets: {sorted(unknown)} are not among {list(names)}.")
  config.optim.sets = {name: dict({k: config.optim[k] for k in optim.SET_KEYS},
                                  **per_set.get(name, {})) for name in names}


def apply_preset(config: ml_collections.ConfigDict, arg: str | None,
                 presets: dict[str, dict[str, Any]]) -> ml_collections.ConfigDict:
  """Applies `arg` = "name" or "key=value,..." (e.g. "size=XL") picking entries of `presets`.

  `presets` maps a preset name to {"dotted.key": value}. A bare name selects that preset; a
  `size=NAME` (or any `x=NAME`) form selects preset NAME as well.
  """
  if not arg:
    return config
  for part in arg.split(","):
    name = part.split("=", 1)[-1].strip()
    if name not in presets:
      from flowjax.registry import unknown_name_message
      raise ValueError(unknown_name_message("preset", name, sorted(presets)))
    for key, value in presets[name].items():
      set_dotted(config, key, value)
  return config


def set_dotted(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  *parents, leaf = key.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  node[leaf] = value


def flatten(config, prefix: str = "") -> dict[str, Any]:
  """{"a.b": value} for every leaf of a ConfigDict (tuples and lists stay leaves)."""
  out = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def to_json(config) -> str:
  tree = config.to_dict() if hasattr(config, "to_dict") else config
  return json.dumps(_jsonable(tree), indent=2, sort_keys=True)


def _tuples(x):
  """JSON's lists as tuples, at every depth (as experiments write sequences)."""
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuples(v) for v in x)
  return x


def from_json(text: str) -> ml_collections.ConfigDict:
  """The locked config that `to_json` wrote (e.g. a workdir's config.json); lists become tuples,
  as experiments write them, so the fingerprint is that of the original config."""
  return ml_collections.ConfigDict(_tuples(json.loads(text))).lock()


def defaults(model: str | None = None, objective: str | None = None) -> dict[str, Any]:
  """The value flowjax gives every key a config may leave out, flattened ("a.b": value) and as
  JSON would write it: model.* and objective.* from the registries' defaults of the named model
  and objective, every other key from base_config. One table for every reader of an older
  config: `with_defaults`, `differences` and the latent cache's spec check."""
  from flowjax import models, objectives  # noqa: F401  (registers the objectives)
  from flowjax.registry import OBJECTIVES
  def leaves(tree, prefix: str) -> dict[str, Any]:  # an empty section is a leaf here
    out = {}
    for key, value in tree.items():
      if isinstance(value, (ml_collections.ConfigDict, dict)) and len(value):
        out.update(leaves(value, f"{prefix}{key}."))
      else:
        out[f"{prefix}{key}"] = value.to_dict() if hasattr(value, "to_dict") else value
    return out

  table = leaves(base_config(), "")
  table.update(leaves(models.DEFAULTS.get(model, {}), "model."))
  try:
    if objective:
      table.update(leaves(OBJECTIVES.get(objective).DEFAULTS, "objective."))
  except KeyError:
    pass
  return json.loads(json.dumps(_jsonable(table)))


def _named_defaults(flat: dict[str, Any]) -> dict[str, Any]:
  return defaults(flat.get("model.name"), flat.get("objective.name"))


def with_defaults(config) -> ml_collections.ConfigDict:
  """A stored config (a workdir's config.json) with every key flowjax added since it was written
  set to its default (`defaults`, which keeps what the older code did). Keys it holds keep their
  values."""
  tree = config.to_dict()
  for key, value in _named_defaults(flatten(tree)).items():
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        break
    else:
      node.setdefault(leaf, _tuples(value))
  return ml_collections.ConfigDict(tree).lock()


def _jsonable(x):
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  return x


def _is_resumable(key: str) -> bool:
  return any(key == r or key.startswith(r + ".") for r in RESUMABLE_KEYS)


def identity(config) -> dict[str, Any]:
  """The flattened config without the keys that may change on resume."""
  flat = flatten(json.loads(to_json(config)))
  return {k: v for k, v in flat.items() if not _is_resumable(k)}


def fingerprint(config) -> str:
  return hashlib.sha256(json.dumps(identity(config), sort_keys=True).encode()).hexdigest()[:16]


def default_value(key: str, flat: dict[str, Any]):
  """The value flowjax gives `key` when a config does not set it (`defaults` for the model and
  objective that the flattened config `flat` names); None when there is none."""
  return _named_defaults(flat).get(key)


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """"key: old -> new" for every flattened key whose value differs. A key that `old` lacks and
  `new` holds at its default (`default_value`) is no difference: it was added to flowjax after
  `old` was written, and its default keeps what the older code did."""
  keys = sorted(set(old) | set(new))
  missing = object()
  new_json = json.loads(json.dumps(_jsonable(new)))
  table = _named_defaults(new)
  added_at_default = {k for k in set(new) - set(old)
                      if new_json[k] is not None and new_json[k] == table.get(k)}
  return [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in keys
          if k not in added_at_default and old.get(k, missing) != new.get(k, missing)]


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key and the fix."""


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def _one_of(config, key: str, allowed) -> None:
  value = config
  for part in key.split("."):
    value = value[part]
  if value not in allowed:
    from flowjax.registry import unknown_name_message
    raise ConfigError(f"config.{key}: " + unknown_name_message("value", str(value),
                                                               [str(a) for a in allowed]))


def _check_sample_times(config) -> None:
  """sample.times: () or num_steps + 1 strictly decreasing times in [0, 1]."""
  times = tuple(config.sample.get("times", ()))
  if not times:
    return
  _check(all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in times)
         and all(0.0 <= t <= 1.0 for t in times)
         and all(a > b for a, b in zip(times, times[1:])),
         f"config.sample.times={times}: give strictly decreasing times in [0, 1] from noise "
         "(t = 1) to data (t = 0), e.g. '(0.994,0.5833,0.006)', or () for the objective's grid.")
  _check(len(times) == config.sample.num_steps + 1,
         f"config.sample.times has {len(times)} times, which make {len(times) - 1} steps, but "
         f"sample.num_steps={config.sample.num_steps}; set --config.sample.num_steps="
         f"{len(times) - 1}.")


def validate(config, num_devices: int) -> None:
  """Checks values and their combinations; raises ConfigError naming the key and the fix."""
  from flowjax import registry
  import flowjax.models  # noqa: F401  (registers the models)
  import flowjax.objectives  # noqa: F401  (registers the objectives)

  for section in SECTIONS:
    _check(section in config, f"config has no section {section!r}; start experiment configs from "
           "flowjax.config.base_config().")
  _check("name" in config.objective, "config.objective.name is not set.")
  _check("name" in config.model, "config.model.name is not set.")
  for kind, reg, name in (("objective", registry.OBJECTIVES, config.objective.name),
                          ("model", registry.MODELS, config.model.name)):
    if name not in reg:
      raise ConfigError(f"config.{kind}.name: " + registry.unknown_name_message(kind, name,
                                                                              reg.names()))
  _check_section_keys(config)
  _check_positive(config, ("train.steps", "train.batch_size", "train.grad_accum_steps",
                           "train.log_every", "ckpt.max_to_keep", "sample.num_steps",
                           "sample.num"))
  _check_non_negative(config, ("optim.lr", "optim.weight_decay", "optim.warmup_steps",
                               "optim.grad_clip", "ckpt.every_steps", "eval.every_steps",
                               "sample.every_steps", "data.num_workers", "data.prefetch"))
  _one_of(config, "train.nonfinite", ("stop", "skip"))
  _check(config.train.get("max_skipped", 0) >= 0,
         f"config.train.max_skipped={config.train.get('max_skipped')}: use 0 or more (the "
         "number of skipped non-finite updates after which train.nonfinite=skip stops).")
  _one_of(config, "train.progress", ("auto", "bar", "lines"))
  _one_of(config, "train.on_divergence", ("warn", "stop", "off"))
  _check(config.train.get("divergence_factor", 5.0) > 2.0,
         f"config.train.divergence_factor={config.train.get('divergence_factor')} must exceed 2 "
         "(the smoothed error or gradient norm, as a multiple of its reference level, that "
         "counts as a divergence; 5 by default).")
  _check(config.train.get("divergence_warmup", 0) >= 0,
         f"config.train.divergence_warmup={config.train.get('divergence_warmup')}: use 0 or more "
         "steps.")
  _one_of(config, "train.matmul_precision", MATMUL_PRECISIONS)
  _one_of(config, "optim.name", ("adamw", "adam", "radam", "sgd"))
  _one_of(config, "optim.schedule", ("constant", "cosine", "linear"))
  if "feature_extractor" in config.eval:
    _one_of(config, "eval.feature_extractor", FEATURE_EXTRACTORS)
  if "latent_scaling" in config.data:
    _one_of(config, "data.latent_scaling", ("channel", "factor", "none"))
  for decay in config.optim.ema_decays:
    _check(0.0 <= decay < 1.0, f"config.optim.ema_decays: {decay} is outside [0, 1).")
  ema_every = config.optim.get("ema_every", 1)
  _check(isinstance(ema_every, int) and not isinstance(ema_every, bool) and ema_every >= 1,
         f"config.optim.ema_every={ema_every!r} must be a positive integer (the EMA is updated "
         "after every ema_every-th step, with decay d^ema_every).")
  _check_sample_times(config)
  _check_repa(config)
  sample_decay = config.sample.get("ema_decay", -1.0)
  _check(sample_decay == -1.0 or sample_decay in tuple(config.optim.ema_decays),
         f"config.sample.ema_decay={sample_decay} is not one of optim.ema_decays "
         f"{tuple(config.optim.ema_decays)}; use one of them, or -1 for the first listed.")
  for key in ("dtype", "param_dtype"):
    if key in config.model:
      _one_of(config, f"model.{key}", ("float32", "bfloat16"))

  mesh_sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
  for axis, size in zip(("data", "fsdp", "tensor"), mesh_sizes):
    _check(size == -1 or size >= 1, f"config.mesh.{axis}={size}: use a positive size or -1 "
           "(all remaining devices).")
  _check(mesh_sizes.count(-1) <= 1, f"config.mesh: only one axis may be -1, got {mesh_sizes}.")
  fixed = 1
  for size in mesh_sizes:
    fixed *= size if size > 0 else 1
  _check(num_devices % fixed == 0 and (-1 in mesh_sizes or fixed == num_devices),
         f"config.mesh (data={config.mesh.data}, fsdp={config.mesh.fsdp}, "
         f"tensor={config.mesh.tensor}) does not fit {num_devices} devices; the product of the "
         "axes must equal the device count (use -1 for one axis to take the rest).")
  batch_shards = (config.mesh.data if config.mesh.data > 0 else num_devices // fixed) * (
      config.mesh.fsdp if config.mesh.fsdp > 0 else num_devices // fixed)
  micro = config.train.batch_size // config.train.grad_accum_steps
  _check(config.train.batch_size % config.train.grad_accum_steps == 0,
         f"config.train.batch_size={config.train.batch_size} is not divisible by "
         f"config.train.grad_accum_steps={config.train.grad_accum_steps}.")
  _check(micro % batch_shards == 0,
         f"config.train.batch_size={config.train.batch_size} (micro-batch {micro}) is not "
         f"divisible by the {batch_shards} batch shards of the mesh (mesh.data x mesh.fsdp); "
         f"use a multiple of {batch_shards}.")
  _one_of(config, "sharding.preset", tuple(RULE_PRESETS))
  rule_names = [r[0] for r in config.sharding.rules]
  _check(len(set(rule_names)) == len(rule_names),
         f"config.sharding.rules names a logical axis twice: {rule_names}; give each axis once.")
  known_axes = {"data", "fsdp", "tensor", None}
  for name, target in config.sharding.rules:
    _check(name in LOGICAL_AXES,
           f"config.sharding.rules maps {name!r}, which no flowjax model names; the logical axes "
           f"are {', '.join(LOGICAL_AXES)}.")
    targets = target if isinstance(target, (tuple, list)) else (target,)
    for t in targets:
      _check(t in known_axes, f"config.sharding.rules maps {name!r} to unknown mesh axis {t!r}; "
             "mesh axes are data, fsdp, tensor.")


def _check_repa(config) -> None:
  """config.repa (absent from configs written before it existed: off)."""
  from flowjax.objectives import repa
  try:
    repa.check_config(config)
  except ValueError as error:
    raise ConfigError(str(error)) from None


def _get(config, key):
  value = config
  for part in key.split("."):
    value = value[part]
  return value


def _check_positive(config, keys) -> None:
  for key in keys:
    _check(_get(config, key) > 0, f"config.{key}={_get(config, key)} must be positive.")


def _check_section_keys(config) -> None:
  """The objective and model sections hold every key their named objective and model read (an
  experiment switched to another objective with --config.objective.name keeps the old keys)."""
  from flowjax import models, objectives
  for kind, default in (("objective", objectives.default_config(config.objective.name)),
                        ("model", models.default_config(config.model.name))):
    missing = sorted(set(default.keys()) - set(config[kind].keys()))
    if missing:
      raise ConfigError(
          f"config.{kind}.name={config[kind].name!r} reads keys that config.{kind} does not have: "
          f"{', '.join(missing)}. Start from an experiment of that {kind} (python -m "
          f"flowjax.catalog lists them), or build the section with flowjax.{kind}s."
          f"default_config({config[kind].name!r}) in the experiment file.")


def _check_non_negative(config, keys) -> None:
  for key in keys:
    _check(_get(config, key) >= 0, f"config.{key}={_get(config, key)} must be >= 0.")


def experiment_module(path: str):
  """The imported experiment file at `path` (its get_config, PRESETS and docstring)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "flowjax_experiment_" + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_experiment(path: str, arg: str | None = None, **overrides) -> ml_collections.ConfigDict:
  """The locked config of an experiment file (as `--config=path:arg`), with dotted overrides.

  load_experiment("experiments/quickstart.py", "tiny", **{"train.steps": 10})
  """
  if not os.path.exists(path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for candidate in (os.path.join(root, path), os.path.join(root, "experiments", path),
                      os.path.join(root, "experiments", path + ".py")):
      if os.path.exists(candidate):
        path = candidate
        break
    else:
      raise FileNotFoundError(f"No experiment file {path!r}; see the experiments/ directory.")
  config = experiment_module(path).get_config(arg)
  for key, value in overrides.items():
    set_dotted(config, key, value)
  return config


def derived_experiment(path: str, arg: str | None, objective: str, overrides=None,
                       **values) -> ml_collections.ConfigDict:
  """The experiment file at `path` trained with another objective: its config without a preset,
  the objective section replaced by `objective`'s defaults with every key of the base objective
  section (its teacher, guidance, schedule, ...) and `values` on top, then the dotted
  `overrides` (e.g. {"train.steps": 600_000}), then the base file's preset `arg`. Parameter
  sets (config.optim.sets) are copied again from the final config.optim, keeping the keys in
  which the base file made a set differ from config.optim and the `optim.sets.*` overrides.

  derived_experiment("experiments/dmd2_digits.py", arg, "fdistill", gan_weight=3e-3)
  """
  from flowjax import objectives
  c = load_experiment(path)
  kept = {k: c.objective[k] for k in c.objective if k != "name"}
  per_set = {name: {k: v for k, v in dict(keys).items() if v != c.optim[k]}
             for name, keys in dict(c.optim.sets).items()}
  with c.unlocked():
    c.objective = objectives.default_config(objective)
    c.objective.update(kept)
    c.objective.update(values)
    for key, value in dict(overrides or {}).items():
      if key.startswith("optim.sets."):  # kept through the copy below
        name, set_key = key[len("optim.sets."):].split(".", 1)
        per_set.setdefault(name, {})[set_key] = value
      else:
        set_dotted(c, key, value)
    apply_preset(c, arg, experiment_module(path).PRESETS)
    if per_set:
      parameter_sets(c, tuple(per_set), **per_set)
  return c.lock()


def toy2d_presets(**tiny) -> dict[str, dict[str, Any]]:
  """The presets every toy2d experiment offers: one per distribution, and `tiny` (a few CPU steps
  in tests) whose entries `tiny` extends or overrides."""
  from flowjax.data import toy2d
  presets = {name: {"data.toy_distribution": name} for name in toy2d.DISTRIBUTIONS}
  presets["tiny"] = {"model.hidden_size": 32, "model.depth": 1, "train.steps": 4,
                     "train.batch_size": 16, "train.log_every": 2, "ckpt.every_steps": 2,
                     "sample.every_steps": 0, "sample.num": 64, "optim.warmup_steps": 0, **tiny}
  return presets
