"""Bits per dimension of exact-likelihood models on a data split.

An objective with an exact likelihood (e.g. an autoregressive flow) provides
`nll(params, batch, rng) -> bits_per_dim`, scalar or [B]; rng feeds its dequantisation noise.
`bits_per_dim` averages it over batches of a split read in order, as the trainer's evaluation
does.
"""

import jax
import jax.numpy as jnp
import numpy as np

_NLL_STREAM = 0x4E4C4C


class NoLikelihoodError(TypeError):
  """The objective has no exact likelihood (no `nll` method)."""


def has_likelihood(objective) -> bool:
  return callable(getattr(objective, "nll", None))


def bits_per_dim(objective, params, config, split: str | None = None,
                 num_batches: int | None = None, *, mesh=None, rng=None) -> float:
  """Mean of `objective.nll(params, batch, rng_k)` over batches k = 0 .. num_batches - 1.

  Args:
    objective: an Objective with `nll(params, batch, rng) -> bits/dim` ([B] or scalar).
    params: its parameters (e.g. the EMA parameters that are sampled from).
    config: the experiment config; `data`, `seed`, `train.batch_size`, `mesh` and `sharding`
      are read.
    split: the split (default `eval.split`), read in order without shuffling; a split smaller
      than num_batches x train.batch_size starts again from its first example.
    num_batches: global batches of train.batch_size (default `eval.num_batches`).
    mesh: the mesh to shard batches over (default: built from `config.mesh`).
    rng: the base key; batch k uses fold_in(rng, k) (default: derived from `config.seed`, so
      repeated evaluations draw the same noise).

  Returns:
    bits per dimension (float), averaged over every example read.
  """
  from flowjax import data, sharding, step as step_lib
  if not has_likelihood(objective):
    raise NoLikelihoodError(
        f"{type(objective).__name__} has no exact likelihood (no nll(params, batch, rng) "
        "method), so bits/dim is undefined for it; use an exact-likelihood objective such as a "
        "normalizing flow, or compare sample quality instead (FID).")
  split = config.eval.split if split is None else split
  num_batches = config.eval.num_batches if num_batches is None else num_batches
  if not isinstance(num_batches, int) or num_batches < 1:
    raise ValueError(f"num_batches must be a positive integer; got {num_batches!r}.")
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
  rules = sharding.rules(config.sharding)
  if rng is None:
    rng = jax.random.fold_in(jax.random.key(config.seed), _NLL_STREAM)
  # Parameters sharded on this mesh are gathered to their compute shardings, as in the train
  # step (sharding.for_compute); others (host or single-device arrays) are left to jit.
  param_shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), params)
  on_mesh = [isinstance(s, jax.sharding.NamedSharding) and s.mesh == mesh
             for s in jax.tree.leaves(param_shardings, is_leaf=lambda s: s is None)]
  if not on_mesh or not all(on_mesh):
    param_shardings = None
  nll = jax.jit(lambda p, batch, key: jnp.mean(objective.nll(
      step_lib.gather_for_compute(p, param_shardings), batch, key)),
                out_shardings=sharding.replicated(mesh))
  batches = data.build(config.data, split=split, global_batch_size=config.train.batch_size,
                       seed=config.seed, sharding=sharding.batch_sharding(mesh), shuffle=False)
  total = 0.0
  try:
    with sharding.context(mesh, rules, config.train.get("matmul_precision", "default")):
      for index in range(num_batches):
        total += float(nll(params, next(batches), jax.random.fold_in(rng, index)))
  finally:
    batches.close()
  return total / num_batches


def per_pixel_categorical_bits(train_images, test_images, levels: int, prior: float = 1.0):
  """Bits/dim on `test_images` of the simplest discrete model: every pixel independent, with
  its own categorical distribution over the `levels` values estimated from `train_images`
  (counts + `prior`, add-one smoothing by default). A reference point for exact-likelihood
  models on the same data; log2(levels) is the uniform model.

  train_images, test_images: [N, ...] in [-1, 1] on the grid k / (levels - 1) * 2 - 1.
  """
  def indices(images):
    images = np.asarray(images, np.float64)
    return np.clip(np.rint((images + 1.0) * 0.5 * (levels - 1)), 0, levels - 1).astype(np.int64)
  train, test = indices(train_images), indices(test_images)
  train = train.reshape(train.shape[0], -1)
  test = test.reshape(test.shape[0], -1)
  counts = np.full((train.shape[1], levels), float(prior))
  np.add.at(counts, (np.broadcast_to(np.arange(train.shape[1]), train.shape), train), 1.0)
  log_probs = np.log2(counts / counts.sum(axis=1, keepdims=True))
  return float(-np.mean(log_probs[np.arange(test.shape[1])[None, :], test]))
