"""Official checkpoints -> flowjax parameters and workdirs.

    python -m flowjax.convert --config=experiments/starflow_imagenet.py \
        --checkpoint=/path/to/starflow.pth --format=starflow --workdir=/path/to/workdir

writes a workdir (an orbax checkpoint at step 0 and config.json) that `--mode=sample`,
`--mode=eval` and `--config.ckpt.init_from` read like one written by training. The config
must build the official architecture (the presets that name an official network do).

Readers (flowjax.state_dicts): a torch state dict as .pt/.pth (needs torch) or .safetensors (no
torch), a .npz of named arrays, an EDM-style network pickle (.pkl, as IMM publishes; no torch, no
code from the file runs: flowjax.network_pickle), and a checkpoint dict holding the state dict
under one of the usual keys ("model", "state_dict", "ema", ...); the "module." / "_orig_mod."
prefixes of DistributedDataParallel and torch.compile are dropped. Every source tensor must be
used and every flowjax parameter filled with its shape: a missing, extra or mis-shaped key stops
the conversion with the list of them.
"""

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flowjax.state_dicts import ConversionError, assemble, conv_kernel, linear, read_state_dict


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
  expected: {path: shape} of the model's parameters (as `convert` takes them from the config).

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


def _songunet_targets(expected, prefix: str, qkv: str, second_map: str) -> dict:
  """flowjax `unet` paths -> (official key, transform) for EDM-style SongUNet state dicts.

  qkv: 'interleaved' (IMM: the 3C-channel 1x1 conv output viewed (C, 3), q | k | v with stride
  3) or 'blocks' (py-meanflow: three contiguous blocks). second_map: the suffix of the second
  time's mapping layers ('_s' in IMM)."""
  targets = {}
  for path in expected:
    module, *inner = path
    if module.startswith(("enc_", "dec_")):
      side, rest = module.split("_", 1)
      name = f"{prefix}{side}.{rest}"
    elif module.startswith("map_") and module[4:].isdigit():
      index = int(module[4:])
      name = f"{prefix}map_{inner[0]}" + ("" if index == 0 else second_map)
      inner = inner[1:]
    else:
      name = prefix + module
    leaf = inner[-1]
    layer = ".".join([name] + list(inner[:-1]))
    if inner[:-1] and inner[-2] in ("query", "key", "value"):
      part = ("query", "key", "value").index(inner[-2])
      base = ".".join([name] + list(inner[:-2])) + ".qkv"

      def pick(array, part=part):
        array = np.asarray(array)
        width = array.shape[0] // 3
        rows = (np.arange(width) * 3 + part if qkv == "interleaved"
                else np.arange(width) + part * width)
        return array[rows]

      if leaf == "kernel":
        targets[path] = (base + ".weight", lambda a, pick=pick: pick(a)[:, :, 0, 0].T)
      else:
        targets[path] = (base + ".bias", pick)
    elif leaf == "kernel":
      weight = layer + ".weight"
      if len(expected[path]) == 4:
        targets[path] = (weight, conv_kernel)
      elif inner[:-1] and inner[-2] == "proj":  # the attention's 1x1 output conv
        targets[path] = (weight, lambda a: np.asarray(a)[:, :, 0, 0].T)
      else:
        targets[path] = (weight, linear)
    elif leaf == "scale":
      targets[path] = (layer + ".weight", lambda a: a)
    else:
      targets[path] = (layer + "." + leaf, lambda a: a)
  return targets


def from_imm_songunet(state_dict, model, expected) -> dict:
  """flowjax `unet` parameters from lumalabs/imm's `IMMPrecond(model_type='SongUNet')` state
  dict (keys under `model.`; Zhou et al., arXiv:2503.07565). `model` must be the official
  architecture (unet.UNET_PRESETS['imm_cifar10'] at its widths: time_mapping='sum', a second
  mapping network for s, the one-hot label scaled by sqrt(label_dim) into the first). The
  fused qkv 1x1 conv is interleaved: output channel 3c + j is q_c, k_c, v_c for j = 0, 1, 2."""
  del model
  targets = _songunet_targets(expected, "model.", "interleaved", "_s")
  return assemble(state_dict, targets, expected, lambda name: name.endswith("resample_filter"),
                  "IMM state dict")


def from_meanflow_songunet(state_dict, model, expected) -> dict:
  """flowjax `unet` parameters from Gsunshine/py-meanflow's `SongUNet` state dict (its own
  keys, or a MeanFlow checkpoint's `net.` / `net_ema.` entries with --key). `model` must be
  unet.UNET_PRESETS['meanflow_cifar10']'s architecture (time_mapping='concat', FIR filter). The
  fused qkv conv is three contiguous blocks q | k | v. `map_augment` (EDM augmentation labels,
  --use_edm_aug) loads into a config with model.augment_dim = its width, and is dropped with
  augment_dim = 0 (it is bias-free and sampling feeds it zeros, so the outputs are the same)."""
  del model
  prefix = ""
  if any(name.startswith("net.") for name in state_dict):
    prefix = "net."
  targets = _songunet_targets(expected, prefix, "blocks", "")
  # The augmentation-label projection (bias-free, fed zeros at sampling) carries nothing into a
  # config without the augmentation input (augment_dim=0): dropped then.
  augment = prefix + "map_augment.weight"
  drop_augment = ("map_augment", "kernel") not in expected
  ignored = lambda name: (name.endswith("resample_filter") or name == "num_updates"
                          or (prefix and not name.startswith(prefix))
                          or (drop_augment and name == augment))
  return assemble(state_dict, targets, expected, ignored, "py-meanflow state dict")


def _split_qkv(array, index: int, axis: int):
  """Part `index` of q | k | v along `axis` of a fused projection."""
  array = np.asarray(array)
  width = array.shape[axis] // 3
  return np.take(array, np.arange(index * width, (index + 1) * width), axis=axis)


def _dit_targets(expected, style: str) -> dict:
  """flowjax `dit` paths -> (official key, transform) for the DiT of Peebles & Xie as IMM
  (style 'imm': a torch state dict under `model.`, timm Attention / Mlp, t and s embedders) and
  the MeanFlow JAX code (style 'meanflow_jax': flat flax `params/net/...` arrays, t and h
  embedders) write it. Both fuse q | k | v, each head-major."""
  targets = {}
  torch_style = style == "imm"
  if torch_style:
    key = lambda *parts: "model." + ".".join(parts)
    dense_keys = lambda name: ((name + ".weight", linear), (name + ".bias", lambda b: b))
    embedders, table = ("t_embedder", "s_embedder"), key("y_embedder.embedding_table.weight")
    # (D, C, p, p) -> (p, p, C, D): (p_row, p_col, c) as flowjax patchifies.
    patch = lambda a: np.asarray(a).transpose(2, 3, 1, 0).reshape(-1, a.shape[0])
  else:
    key = lambda *parts: "params/net/" + "/".join(parts)
    dense_keys = lambda name: ((name + "/_flax_linear/kernel", lambda a: a),
                               (name + "/_flax_linear/bias", lambda a: a))
    embedders = ("t_embedder", "h_embedder")
    table = key("y_embedder/embedding_table/_flax_embedding/embedding")
    patch = lambda a: np.asarray(a).reshape(-1, a.shape[-1])  # [p, p, C, D]
  modulation = "adaLN_modulation.1" if torch_style else "adaLN_modulation/layers_1"
  mlp = (("mlp.0", "mlp.2") if torch_style else ("mlp/layers_0", "mlp/layers_2"))

  def dense(path, name):
    (kernel_key, kernel), (bias_key, bias) = dense_keys(name)
    targets[path + ("kernel",)] = (kernel_key, kernel)
    targets[path + ("bias",)] = (bias_key, bias)

  depth = len({path[0] for path in expected if path[0].startswith("block_")})
  for i in range(depth):
    ours = (f"block_{i}",)
    block_name = f"blocks.{i}" if torch_style else f"blocks/layers_{i}"
    block = lambda *parts, block_name=block_name: key(block_name, *parts)
    dense(ours + ("adaLN_modulation",), block(modulation))
    (qkv_kernel, _), (qkv_bias, _) = dense_keys(block("attn", "qkv"))
    for index, name in enumerate(("query", "key", "value")):
      if torch_style:  # (3D, D) torch weight: split rows, then transpose
        targets[ours + ("attn", name, "kernel")] = (
            qkv_kernel, lambda a, index=index: _split_qkv(a, index, 0).T)
      else:  # (D, 3D) flax kernel
        targets[ours + ("attn", name, "kernel")] = (
            qkv_kernel, lambda a, index=index: _split_qkv(a, index, -1))
      targets[ours + ("attn", name, "bias")] = (
          qkv_bias, lambda a, index=index: _split_qkv(a, index, -1))
    dense(ours + ("attn", "out"), block("attn", "proj"))
    dense(ours + ("mlp", "fc1"), block("mlp", "fc1"))
    dense(ours + ("mlp", "fc2"), block("mlp", "fc2"))
  dense(("final", "adaLN_modulation"), key("final_layer", modulation))
  dense(("final", "linear"), key("final_layer", "linear"))
  targets[("label_embed", "table", "embedding")] = (table, lambda a: a)
  for index, name in enumerate(embedders):
    dense((f"time_embed_{index}", "fc1"), key(name, mlp[0]))
    dense((f"time_embed_{index}", "fc2"), key(name, mlp[1]))
  if torch_style:
    patch_key, patch_bias = key("x_embedder.proj.weight"), key("x_embedder.proj.bias")
  else:
    patch_key, patch_bias = key("x_embedder/proj/kernel"), key("x_embedder/proj/bias")
  targets[("x_embed", "kernel")] = (patch_key, patch)
  targets[("x_embed", "bias")] = (patch_bias, lambda a: a)
  return targets


def from_imm_dit(state_dict, model, expected) -> dict:
  """flowjax `dit` parameters from lumalabs/imm's `IMMPrecond(model_type='DiT')` state dict
  (keys under `model.`): timm's fused qkv [q | k | v], head-major; the patch-embedding conv
  (D, C, p, p) -> a (p p C, D) kernel; t_embedder / s_embedder -> time_embed_0 / _1; the label
  table of num_classes + 1 rows (the last for an all-zero, unconditional one-hot). The fixed
  2-D sin-cos position table must be flowjax's (checked)."""
  from flowjax.models import layers
  table = state_dict.get("model.pos_embed")
  if table is not None:
    width = table.shape[-1]
    side = int(round(math.sqrt(table.shape[-2])))
    ours = np.asarray(layers.sincos_pos_embed_2d(width, side, side)).reshape(table.shape)
    if not np.allclose(table, ours, atol=1e-5):
      raise ConversionError("The IMM state dict's model.pos_embed is not the fixed 2-D sin-cos "
                            "table flowjax's DiT uses (a learned or differently ordered table); "
                            "it cannot be loaded.")
  del model
  return assemble(state_dict, _dit_targets(expected, "imm"), expected,
                  lambda name: name == "model.pos_embed", "IMM DiT state dict")


def from_meanflow_jax_dit(state_dict, model, expected) -> dict:
  """flowjax `dit` parameters from a Gsunshine/meanflow (JAX) checkpoint of `models_dit.DiT`
  inside `MeanFlow`, as flat {"params/net/...": array} (e.g. an .npz of its flattened params).

  The architectures agree (adaLN-Zero blocks, LayerNorm eps 1e-6 without affine, tanh GELU,
  [cos, sin] frequency embeddings of the raw times, MAE 2-D sin-cos positions, a label table of
  num_classes + 1 rows, c = t + h + y; the preset needs model.time_scale = 1); only names and the
  fused qkv projection differ: its (in, 3 D) kernel is [q | k | v], each head-major; Dense
  kernels are already (in, out)."""
  del model
  ignored = lambda name: not name.startswith("params/net/")  # other collections and networks
  return assemble(state_dict, _dit_targets(expected, "meanflow_jax"), expected, ignored,
                  "MeanFlow JAX checkpoint")


def from_diffusers_autoencoder(state_dict, model, expected) -> dict:
  """flowjax `autoencoder` parameters from a diffusers `AutoencoderKL` state dict (e.g. the
  `diffusion_pytorch_model.safetensors` of stabilityai/sd-vae-ft-ema), through the autoencoder's
  explicit key map (current and legacy attention names)."""
  from flowjax.models import autoencoder
  del model
  shapes = traverse_util.unflatten_dict(
      {path: jax.ShapeDtypeStruct(shape, jnp.float32) for path, shape in expected.items()})
  try:
    params = autoencoder.params_from_diffusers(dict(state_dict), shapes, "the diffusers file")
  except ValueError as error:
    raise ConversionError(str(error)) from error
  return jax.tree.map(jnp.asarray, params)


CONVERTERS = {"starflow": from_starflow, "tarflow": from_tarflow,
              "imm_songunet": from_imm_songunet, "imm_dit": from_imm_dit,
              "meanflow_songunet": from_meanflow_songunet,
              "meanflow_jax_dit": from_meanflow_jax_dit, "sdvae": from_diffusers_autoencoder}


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
  from flowjax import storage
  if storage.listdir(storage.join(workdir, "checkpoints")):
    raise ConversionError(f"--workdir={workdir} already holds checkpoints; convert into a new "
                          "workdir.")
  setup = train.build(config)
  with train.context(setup):
    state = setup.init_fn()
  params = jax.device_put(params, setup.state_shardings.params)
  state = state.replace(params=params, ema=optim.init_ema(params, config.optim.ema_decays))
  storage.makedirs(workdir)
  mngr = checkpoint.manager(workdir, config.ckpt)
  meta = {"fingerprint": config_lib.fingerprint(config), "identity": config_lib.identity(config),
          "converted": True}
  checkpoint.save(mngr, state, {"next_batch": 0}, meta, force=True)
  checkpoint.finish(mngr)
  if jax.process_index() == 0:
    storage.write_text(storage.join(workdir, "config.json"), config_lib.to_json(config))


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
