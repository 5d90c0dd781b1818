"""Sample-quality and likelihood evaluation of a trained model.

Evaluators see a model through `Evaluable`, the few things they use (the config, the objective,
the mesh, the data's shape, the sampled parameters and a sampler), never through the trainer:
flowjax.train builds one (`train.evaluable`) and the evaluators stay importable on their own.
"""

from typing import Any, Callable, NamedTuple

import jax

from flowjax.data import DataInfo


class Evaluable(NamedTuple):
  """A trained model as the evaluators see it.

  config: the experiment config (eval.*, data, seed, mesh, sharding and train.batch_size are
    read); objective: the built objective (nll for exact-likelihood models); mesh, rules,
    precision: what models trace under (flowjax.sharding.context); info: the data's shape and
    classes; params: the sampled parameters (sample.use_ema, sample.ema_decay); sample:
    (rng) -> [config.train.batch_size, ...] samples of the configured sampler, labels cycling
    over the classes; rng: the evaluation key (the same at every step, so that values at
    different steps are comparable).
  """
  config: Any
  objective: Any
  mesh: jax.sharding.Mesh
  rules: Any
  precision: str
  info: DataInfo
  params: Any
  sample: Callable[[jax.Array], jax.Array]
  rng: jax.Array


def quality_metrics(model: Evaluable) -> dict:
  """eval_bits_per_dim (exact-likelihood objectives) and eval_fid, eval_precision, eval_recall
  and, in Inception features, eval_inception_score(_std) (when the feature extractor's weights and
  the reference statistics are configured) of the sampled parameters."""
  from flowjax.evals import fid, nll  # here, so that `python -m flowjax.evals.fid` runs cleanly
  result = {}
  if nll.has_likelihood(model.objective):
    result["eval_bits_per_dim"] = nll.bits_per_dim(model.objective, model.params, model.config,
                                                   mesh=model.mesh)
  result.update(fid.evaluate_run(model))
  return result
