"""Official checkpoints -> flowjax parameters and workdirs.

    python -m flowjax.convert --config=experiments/starflow_imagenet.py \
        --checkpoint=/path/to/starflow.pth --format=starflow --workdir=/path/to/workdir

writes a workdir (an orbax checkpoint at step 0 and config.json) that `--mode=sample`,
`--mode=eval` and `--config.ckpt.init_from` read like one written by training. The config
must build the official architecture (the presets that name an official network do).

Readers: a torch state dict as .pt/.pth (needs torch) or .safetensors (no torch), a .npz of named
arrays, and a checkpoint dict holding the state dict under one of the usual keys ("model",
"state_dict", "ema", ...); the "module." / "_orig_mod." prefixes of DistributedDataParallel and
torch.compile are dropped. Every source tensor must be used and every flowjax parameter filled
with its shape: a missing, extra or mis-shaped key stops the conversion with the list of them.
"""

import os
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

CHECKPOINT_KEYS = ("model", "state_dict", "model_state_dict", "net", "ema", "module")


class ConversionError(ValueError):
  pass


def read_state_dict(path: str, key: str = "") -> dict[str, np.ndarray]:
  """{name: float32 NumPy array} of a torch state dict in .safetensors, .npz or .pt/.pth.

  key: the entry of a checkpoint dict that holds the state dict ("" = find it: the file itself,
  or the first of CHECKPOINT_KEYS present).
  """
  if not os.path.isfile(path):
    raise ConversionError(f"--checkpoint={path!r} is not a file.")
  extension = os.path.splitext(path)[1].lower()
  try:
    if extension == ".safetensors":
      from safetensors import numpy as safetensors_numpy
      tensors = safetensors_numpy.load_file(path)
    elif extension == ".npz":
      with np.load(path, allow_pickle=False) as data:
        tensors = {name: data[name] for name in data.files}
    elif extension in (".pt", ".pth", ".bin", ".ckpt"):
      try:
        import torch
      except ImportError as error:
        raise ConversionError(
            f"{path} is a torch pickle and reading it needs torch (pip install torch); or save "
            "the state dict as .safetensors, which flowjax reads without torch.") from error
      tensors = torch.load(path, map_location="cpu", weights_only=True)
    else:
      raise ConversionError(f"--checkpoint={path!r}: unknown file type {extension!r}; use "
                            ".safetensors, .npz, .pt or .pth.")
  except ConversionError:
    raise
  except Exception as error:
    raise ConversionError(f"{path} could not be read ({type(error).__name__}: "
                          f"{str(error)[:300]}); is it a complete, uncorrupted file?") from error
  tensors = _find_state_dict(tensors, key, path)
  return {_strip_wrappers(name): _to_numpy(value) for name, value in tensors.items()}


def _strip_wrappers(name: str) -> str:
  """Drops the prefixes DistributedDataParallel ("module.") and torch.compile ("_orig_mod.")
  add to every key."""
  for prefix in ("module.", "_orig_mod."):
    while name.startswith(prefix):
      name = name[len(prefix):]
  return name


def _find_state_dict(tensors, key: str, path: str) -> Mapping:
  if key:
    if key not in tensors:
      raise ConversionError(f"{path} has no entry {key!r}; its top-level keys: "
                            f"{sorted(map(str, tensors))[:20]}.")
    return tensors[key]
  if all(hasattr(value, "shape") for value in tensors.values()):
    return tensors
  for name in CHECKPOINT_KEYS:
    if isinstance(tensors.get(name), Mapping):
      return tensors[name]
  raise ConversionError(f"{path} is not a state dict and holds none under "
                        f"{list(CHECKPOINT_KEYS)}; pass --key with the entry that holds it. "
                        f"Its top-level keys: {sorted(map(str, tensors))[:20]}.")


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, np.float32)


def linear(weight):
  """torch Linear weight (out, in) -> flax Dense kernel (in, out)."""
  return np.asarray(weight).T


def assemble(sources: Mapping[str, np.ndarray],
             targets: Mapping[tuple, tuple[str, Callable]],
             expected: Mapping[tuple, tuple], ignored: Callable[[str], bool] = lambda _: False,
             what: str = "checkpoint") -> dict:
  """A flowjax parameter tree from named source tensors.

  targets: flowjax path -> (source name, transform of the source array); expected: flowjax path
  -> shape (every parameter of the model); ignored(name): source entries that carry no
  parameter (buffers). Raises ConversionError listing the missing, extra and mis-shaped keys.
  """
  missing, misshaped, out = [], [], {}
  for path, shape in sorted(expected.items()):
    if path not in targets:
      missing.append(f"{'/'.join(path)} (no source)")
      continue
    name, transform = targets[path]
    if name not in sources:
      missing.append(name)
      continue
    value = np.asarray(transform(sources[name]), np.float32)
    if value.shape != tuple(shape):
      misshaped.append(f"{name} {tuple(sources[name].shape)} -> {'/'.join(path)} needs "
                       f"{tuple(shape)}")
      continue
    out[path] = value
  used = {targets[path][0] for path in expected if path in targets}
  extra = sorted(name for name in sources if name not in used and not ignored(name))
  problems = []
  for label, names in (("missing", missing), ("extra", extra), ("mis-shaped", misshaped)):
    if names:
      shown = "\n    ".join(names[:20]) + (f"\n    ... {len(names) - 20} more"
                                              if len(names) > 20 else "")
      problems.append(f"  {len(names)} {label}:\n    {shown}")
  if problems:
    raise ConversionError(
        f"The {what} does not fit this model:\n" + "\n".join(problems) + "\nCheck that the "
        "config builds the same architecture as the checkpoint (widths, depths, number of "
        "blocks and classes; the preset that names the official network).")
  return traverse_util.unflatten_dict({path: jnp.asarray(v) for path, v in out.items()})


def parameter_shapes(model: nn.Module, *example) -> dict[tuple, tuple]:
  """{path: shape} of every parameter of `model` initialised on `example` (no allocation)."""
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *example))
  params = nn.meta.unbox(variables["params"])
  return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(params).items()}


def _flow_targets(model) -> dict:
  """flowjax tarflow paths -> (official key, transform) for STARFlow / TarFlow state dicts."""
  targets = {}

  def dense(path, name):
    targets[path + ("kernel",)] = (name + ".weight", linear)
    targets[path + ("bias",)] = (name + ".bias", lambda b: b)

  width = model.hidden_size
  for i in range(model.num_blocks):
    ours, theirs = (f"blocks_{i}",), f"blocks.{i}"
    dense(ours + ("proj_in",), theirs + ".proj_in")
    dense(ours + ("proj_out",), theirs + ".proj_out")
    targets[ours + ("start_token",)] = (theirs + ".sos_embed", lambda a: a.reshape(-1))
    targets[ours + ("pos_embed",)] = (theirs + ".pos_embed", lambda a: a)
    dense(ours + ("label_token",), theirs + ".proj_txt")
    targets[ours + ("label_embed", "table")] = (theirs + ".class_embed",
                                                lambda a: a.reshape(a.shape[0], -1))
    targets[ours + ("final_norm", "scale")] = (theirs + ".final_norm.weight", lambda a: a)
    targets[ours + ("final_norm", "bias")] = (theirs + ".final_norm.bias", lambda a: a)
    for j in range(model.block_depth(i)):
      layer, source = ours + (f"layers_{j}",), f"{theirs}.attn_blocks.{j}"
      for norm, module in (("norm1", "attention"), ("norm2", "mlp")):
        targets[layer + (norm, "scale")] = (f"{source}.{module}.norm.weight", lambda a: a)
        targets[layer + (norm, "bias")] = (f"{source}.{module}.norm.bias", lambda a: a)
      for index, name in enumerate(("query", "key", "value")):
        part = slice(index * width, (index + 1) * width)
        targets[layer + ("attn", name, "kernel")] = (
            f"{source}.attention.qkv.weight", lambda a, part=part: a[part].T)
        targets[layer + ("attn", name, "bias")] = (
            f"{source}.attention.qkv.bias", lambda a, part=part: a[part])
      dense(layer + ("attn", "out"), f"{source}.attention.proj")
      dense(layer + ("mlp", "fc1"), f"{source}.mlp.main.0")
      dense(layer + ("mlp", "fc2"), f"{source}.mlp.main.2")
  return targets


def _flow_buffer(name: str) -> bool:
  """State-dict entries of STARFlow / TarFlow that are buffers, not parameters."""
  return (name.endswith(".attn_mask") or name.startswith("feat_rope") or name == "var")


def _check_unit_prior(state_dict, what: str) -> None:
  """The `var` buffer (a learned prior variance of the volume-preserving variant) must be 1."""
  var = state_dict.get("var")
  if var is not None and not np.all(np.asarray(var) == 1.0):
    raise ConversionError(
        f"The {what} has a prior variance `var` other than 1 (a volume-preserving model, "
        "nvp=False); flowjax's flows have a unit Gaussian prior and cannot load it.")


def from_starflow(state_dict: Mapping[str, np.ndarray], model, expected) -> dict:
  """flowjax `tarflow` parameters from an apple/ml-starflow `transformer_flow.Model` state dict
  (Gu et al., arXiv:2506.06276). `model` must be built with the official options: positions=
  'rope', label_input='token', final_norm='rmsnorm', norm_eps=1e-5, gelu='exact', start_token,
  scale='softplus', soft_clip=4 and `order` = its seq_order (`tarflow.STARFLOW_OPTIONS`);
  expected: {path: shape} of the model's parameters (`parameter_shapes`).

  Layouts: torch Linear (out, in) -> Dense (in, out); the fused qkv is [q | k | v], each
  head-major; sos_embed (1, 1, C) -> start_token (C,); proj_txt (the class "caption" one-hot
  projection) -> label_token. The attention masks, RoPE tables and `var` are buffers.
  """
  _check_unit_prior(state_dict, "STARFlow state dict")
  return assemble(state_dict, _flow_targets(model), expected, _flow_buffer,
                  "STARFlow state dict")


def from_tarflow(state_dict: Mapping[str, np.ndarray], model, expected) -> dict:
  """flowjax `tarflow` parameters from an apple/ml-tarflow `transformer_flow.Model` state dict
  (Zhai et al., arXiv:2412.06329, nvp=True). `model` must be built with `tarflow.TARFLOW_OPTIONS`
  (the one-token shift, exp scale, learned positions, a class embedding added to every token
  with the class mean for a dropped label, no final norm, channel-first patches).

  Layouts as in from_starflow; class_embed (num_classes, 1, C) -> label_embed/table."""
  _check_unit_prior(state_dict, "TarFlow state dict")
  return assemble(state_dict, _flow_targets(model), expected, _flow_buffer,
                  "TarFlow state dict")


CONVERTERS = {"starflow": from_starflow, "tarflow": from_tarflow}


def convert_params(fmt: str, state_dict, model, expected) -> dict:
  """flowjax parameters of `model` from an official state dict of format `fmt`."""
  if fmt not in CONVERTERS:
    from flowjax.registry import unknown_name_message
    raise ConversionError("--format: " + unknown_name_message("format", fmt, list(CONVERTERS)))
  return CONVERTERS[fmt](state_dict, model, expected)


def write_workdir(config, params, workdir: str) -> None:
  """A workdir holding `params` as the step-0 checkpoint of `config` (EMA trees = params) and
  its config.json: what `--mode=sample/eval` and `ckpt.init_from` read."""
  from flowjax import checkpoint, optim, train
  from flowjax import config as config_lib
  if os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(
      os.path.join(workdir, "checkpoints")):
    raise ConversionError(f"--workdir={workdir} already holds checkpoints; convert into a new "
                          "workdir.")
  setup = train.build(config)
  with train.context(setup):
    state = setup.init_fn()
  params = jax.device_put(params, setup.state_shardings.params)
  state = state.replace(params=params, ema=optim.init_ema(params, config.optim.ema_decays))
  os.makedirs(workdir, exist_ok=True)
  mngr = checkpoint.manager(workdir, config.ckpt)
  meta = {"fingerprint": config_lib.fingerprint(config), "identity": config_lib.identity(config),
          "converted": True}
  checkpoint.save(mngr, state, {"next_batch": 0}, meta, force=True)
  checkpoint.finish(mngr)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(config))


def convert(config, checkpoint_path: str, fmt: str, workdir: str, key: str = "") -> dict:
  """Reads an official checkpoint, converts it for `config`'s model and writes `workdir`.
  Returns the parameters."""
  from flowjax import train
  state_dict = read_state_dict(checkpoint_path, key)
  setup = train.build(config)
  model = setup.objective.model
  expected = {path: tuple(leaf.shape) for path, leaf in
              traverse_util.flatten_dict(setup.abstract_state.params).items()}
  params = convert_params(fmt, state_dict, model, expected)
  write_workdir(config, params, workdir)
  return params


def main(argv):
  del argv
  from absl import logging

  from flowjax import main as main_lib
  from flowjax import metrics
  metrics.quiet_libraries()
  config = main_lib.load_config()
  from flowjax import config as config_lib
  try:
    convert(config, _CHECKPOINT.value, _FORMAT.value, main_lib._WORKDIR.value, _KEY.value)
  except (ConversionError, config_lib.ConfigError) as error:
    logging.error("%s: %s", type(error).__name__, error)
    main_lib.exit_now(1)
  logging.info("Wrote %s: python -m flowjax.main --config=... --workdir=%s --mode=sample",
               main_lib._WORKDIR.value, main_lib._WORKDIR.value)
  main_lib.exit_now(0)


if __name__ == "__main__":
  from absl import app, flags

  from flowjax import main as main_lib
  _CHECKPOINT = flags.DEFINE_string("checkpoint", None, "The official checkpoint file.")
  _FORMAT = flags.DEFINE_enum("format", None, list(CONVERTERS), "What wrote --checkpoint.")
  _KEY = flags.DEFINE_string("key", "", "The entry of a checkpoint dict holding the state dict "
                             "(default: the file itself, or 'model', 'state_dict', 'ema', ...).")
  flags.mark_flags_as_required(["checkpoint", "format"])
  app.run(main, flags_parser=main_lib.parse_flags)
