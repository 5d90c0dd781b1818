"""Memory planning: an analytic count of the bytes per device a train step needs.

The count sits next to XLA's own estimate (`compiled.memory_analysis()`), which on fake CPU
devices is an estimate of the plan, not a measurement of TPU or GPU memory:
  python -m flowjax.bench --config=experiments/imm_imagenet.py:XL --num_cpu_devices=8 \
      --config.mesh.data=1 --config.mesh.fsdp=8 --config.train.dry_run=True

Analytic parts, per device:
  state: parameters, optimizer state and EMA trees, from their shardings (exact);
  gradients: one parameter-sized tree, sharded like the parameters (exact);
  activations: what the backward pass keeps, for transformer backbones (DiT, TarFlow) only.
    Per layer and example, with s tokens (counting the prefix tokens of a text model's caption
    or a flow's label token), width h, a heads and a c-byte compute dtype, without
    rematerialisation (`model.remat='none'`; 'dots' is counted as 'none'): c (18 s h + a s^2):
    the normalised inputs of the attention and MLP, q, k, v, the attention probabilities, the
    attention output, the MLP's hidden layer before and after its activation (4 h each) and the
    gated branches (the transformer count of Korthikanti et al., 2022, without dropout masks);
    with `remat='full'` only each layer's float32 input (4 s h) plus one layer being recomputed.
    Forward-mode objectives (MeanFlow's JVP) keep primal and tangent: twice.
"""

import math

import jax
import jax.numpy as jnp

# Objectives whose differentiated pass carries a JVP: the tangents double what is kept.
_PASSES = {"meanflow": 2}


def _tree_bytes_per_device(abstract, shardings) -> int:
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    total += math.prod(sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
  return total


def _transformer_shape(config, info):
  """(tokens of each transformer layer, width, heads, compute bytes) of a DiT or an
  autoregressive flow on images, or None. A flow block that reads the condition as prefix
  tokens (the caption's text_length, or one label token) attends over them too."""
  model = config.model
  if model.name not in ("dit", "tarflow") or len(info.image_shape) != 3:
    return None
  height, width = info.image_shape[:2]
  tokens = (height // model.patch_size) * (width // model.patch_size)
  if model.name == "dit":
    prefix = int(model.get("text_length", 0)) if int(model.get("text_dim", 0)) else 0
    layers = [tokens + prefix] * model.depth
  else:  # autoregressive flow: shallow blocks and the deep one
    if int(model.get("text_dim", 0)):
      prefix = int(model.text_length)
    else:
      prefix = int(model.label_input == "token" and int(info.num_classes) > 0)
    layers = []
    for index in range(model.num_blocks):
      last = index == model.num_blocks - 1
      depth = model.deep_layers if last and model.deep_layers else model.layers_per_block
      conditioned = model.condition == "all" or last
      layers += [tokens + (prefix if conditioned else 0)] * depth
  return (layers, model.hidden_size, model.num_heads, jnp.dtype(model.dtype).itemsize)


def activation_bytes(config, info, examples_per_device: int) -> int | None:
  """The analytic activation bytes per device (module docstring), or None for backbones without
  a formula."""
  shape = _transformer_shape(config, info)
  if shape is None:
    return None
  layers, h, a, c = shape
  per_layer = [c * (18 * s * h + a * s * s) for s in layers]
  if config.model.get("remat", "none") == "full":
    kept = sum(4 * s * h for s in layers) + max(per_layer)
  else:
    kept = sum(per_layer)
  passes = _PASSES.get(config.objective.name, 1)
  return passes * kept * examples_per_device


def plan(setup) -> dict:
  """MiB per device: analytic state, gradients and activations, and their total."""
  config = setup.config
  state = setup.abstract_state
  shardings = setup.state_shardings
  mesh_shape = dict(setup.mesh.shape)
  batch_shards = mesh_shape["data"] * mesh_shape["fsdp"]
  examples = config.train.batch_size // config.train.grad_accum_steps // batch_shards
  mib = lambda n: round(n / 2**20, 1)
  out = {
      "params": _tree_bytes_per_device(state.params, shardings.params),
      "optimizer": _tree_bytes_per_device(state.opt_state, shardings.opt_state),
      "ema": _tree_bytes_per_device(state.ema, shardings.ema),
  }
  out["gradients"] = out["params"]
  activations = activation_bytes(config, setup.info, examples)
  if activations is not None:
    out["activations"] = activations
  out["total"] = sum(out.values())
  result = {k + "_mib": mib(v) for k, v in out.items()}
  result["examples_per_device"] = examples
  if activations is None:
    result["activations_mib"] = None
  return result
