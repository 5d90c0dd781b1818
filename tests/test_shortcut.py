"""Shortcut model properties (Frans et al., arXiv:2410.12557): the time conversion reproduces the
reference interpolation, exact shortcuts of a Gaussian flow compose, the self-consistency target
of an exact model is the exact 2d-shortcut, the finest level is flow matching, targets come from
the EMA parameters and are clipped, the N-step sampler, and a tiny end-to-end run."""

import importlib.util
import json
import math
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from flowjax import config as config_lib
from flowjax import models, objectives, paths, train
from flowjax.models import layers
from flowjax.objectives import flow_matching, shortcut
from flowjax.samplers import ode
from flowjax.samplers import shortcut as shortcut_sampler

from helpers import run_batch_errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (3,)
NUM_CLASSES = 4


class TinyBackbone(nn.Module):
  """Dense -> tanh -> dropout -> Dense on [x, t, level code, one-hot label]. Called with one time
  (flow matching) it uses the finest level's code 1, so both objectives share one parameter
  tree."""
  num_classes: int = 0
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, times, cond, *, train):
    if len(times) == 1:
      times = (times[0], jnp.ones_like(times[0]))
    features = [x.reshape(x.shape[0], -1)] + [t[:, None] for t in times]
    if self.num_classes:
      labels = jnp.full(x.shape[:1], self.num_classes) if cond is None else cond
      features.append(jax.nn.one_hot(labels, self.num_classes + 1))
    h = jnp.tanh(nn.Dense(16)(jnp.concatenate(features, axis=-1)))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return nn.Dense(features[0].shape[-1])(h).reshape(x.shape)


class TimesEcho(nn.Module):
  """Returns the second time input (the level code) broadcast to x's shape."""

  @nn.compact
  def __call__(self, x, times, cond, *, train):
    return jnp.broadcast_to(times[1][:, None], x.shape)


def make_objective(num_classes=0, dropout=0.0, **overrides):
  model = TinyBackbone(num_classes=num_classes, dropout=dropout)
  return shortcut.Shortcut(model=model, image_shape=SHAPE, num_classes=num_classes, **overrides)


def random_params(objective, seed=0, scale=0.5):
  batch = {"image": jnp.zeros((1,) + SHAPE), "label": jnp.zeros((1,), jnp.int32)}
  shapes = jax.eval_shape(lambda: nn.meta.unbox(objective.init(jax.random.key(0), batch)[0]))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype),
                      shapes)


def labelled_batch(seed, size=16):
  keys = jax.random.split(jax.random.key(seed), 2)
  return {"image": jax.random.normal(keys[0], (size,) + SHAPE),
          "label": jax.random.randint(keys[1], (size,), 0, NUM_CLASSES)}


def gaussian_flow(mu, var):
  """Exact flow of data N(mu, var I) on the OT path x_t = (1 - t) x + t eps: x_t ~ N(m_t, s_t^2),
  m_t = (1 - t) mu, s_t^2 = (1 - t)^2 var + t^2, and the flow keeps the standardised
  coordinate, x_r = m_r + (s_r / s_t)(x - m_t). Returns flow(x, t, r); t, r: [B]."""
  m = lambda t: (1.0 - t) * mu
  s = lambda t: jnp.sqrt((1.0 - t) ** 2 * var + t**2)

  def flow(x, t, r):
    t, r = paths.expand(t, x), paths.expand(r, x)
    return m(r) + s(r) / s(t) * (x - m(t))

  return flow


def test_time_conversion_reproduces_the_reference_interpolation():
  """With t = 1 - t_ref, x_t equals the reference's (1 - (1 - 1e-5) t_ref) x0 + t_ref x1 (x0 the
  noise, x1 the data), and the velocity is the reference's x1 - (1 - 1e-5) x0 negated."""
  objective = make_objective()
  keys = jax.random.split(jax.random.key(0), 3)
  x1 = jax.random.normal(keys[0], (64,) + SHAPE)  # data
  x0 = jax.random.normal(keys[1], x1.shape)  # noise
  t_ref = jax.random.uniform(keys[2], (64,)).at[:2].set(jnp.array([0.0, 1.0]))
  reference = (1 - (1 - 1e-5) * t_ref[:, None]) * x0 + t_ref[:, None] * x1
  ours = objective.interpolate(x1, x0, shortcut.from_reference_time(t_ref))
  np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(objective.velocity(x1, x0), -(x1 - (1 - 1e-5) * x0), rtol=1e-6)
  # The reference's data end (with its 1e-5 noise) is flowjax's t = 0, its noise end t = 1.
  np.testing.assert_allclose(ours[1], x1[1] + 1e-5 * x0[1], atol=1e-6)
  np.testing.assert_allclose(ours[0], x0[0], atol=1e-6)
  # The bootstrap grid t_ref = k d (k < 2^level) is t = 1 - k d in [d, 1].
  level = jnp.full((4096,), 3, jnp.int32)
  t = objective.grid_times(jax.random.key(1), level)
  assert set(np.round(np.asarray(t) * 8).astype(int)) == set(range(1, 9))
  np.testing.assert_allclose(np.asarray(t) * 8, np.round(np.asarray(t) * 8), atol=1e-5)


def test_exact_gaussian_shortcuts_compose():
  """On the exact Gaussian flow, s(x, t, level) = (x - flow(x, t, t - d)) / d: two half steps
  equal one full step (the sampler with 2^k steps gives the same samples for every k), and the
  self-consistency target built from the exact d/2-shortcut is the exact d-shortcut."""
  mu, var = jnp.array([1.5, -0.5, 0.0]), 0.3
  flow = gaussian_flow(mu, var)

  def exact(x, t, level):
    d = jnp.exp2(-level.astype(jnp.float32))
    return (x - flow(x, t, t - d)) / paths.expand(d, x)

  keys = jax.random.split(jax.random.key(2), 3)
  x1 = jax.random.normal(keys[0], (4096,) + SHAPE)
  level = jax.random.randint(keys[1], (4096,), 0, 6)
  t = make_objective().grid_times(keys[2], level)

  @jax.jit
  def compute(x1, level, t):
    samples = [shortcut_sampler.solve(exact, x1, 2**k) for k in (0, 1, 3)]
    x_t = flow(x1, jnp.ones_like(t), t)  # points on trajectories at time t
    target = shortcut.self_consistency_target(exact, x_t, t, level, clip=100.0)
    return samples, target, exact(x_t, t, level)

  samples, target, full = compute(x1, level, t)
  for other in samples[1:]:
    np.testing.assert_allclose(other, samples[0], atol=2e-5)
  np.testing.assert_allclose(samples[0], mu + np.sqrt(var) * x1, atol=2e-5)
  np.testing.assert_allclose(target, full, rtol=1e-4, atol=1e-4)
  # A wrong half-step model (the instantaneous velocity) does not give the exact 2d-shortcut.
  wrong = shortcut.self_consistency_target(lambda x, t_, lv: exact(x, t_, jnp.full_like(lv, 10)),
                                           flow(x1, jnp.ones_like(t), t), t, level, 100.0)
  assert float(jnp.max(jnp.abs(wrong - full))) > 1e-2


def test_finest_level_is_flow_matching():
  """At level L with the path's velocity as target and sigma_min = 0, the shortcut loss is flow
  matching's loss on the same rng-derived t, eps, dropped labels and dropout mask."""
  objective = make_objective(NUM_CLASSES, dropout=0.2, sigma_min=0.0)
  fm = flow_matching.FlowMatching(model=objective.model, image_shape=SHAPE,
                                  num_classes=NUM_CLASSES, time_sampler="uniform")
  params = random_params(objective)
  batch = labelled_batch(3, 32)
  rng = jax.random.key(7)
  expected, _ = fm.loss(params, batch, rng, 0, None)
  time_key, noise_key, drop_key, model_key = jax.random.split(rng, 4)
  x = batch["image"]
  t = jax.random.uniform(time_key, (32,))
  eps = jax.random.normal(noise_key, x.shape)
  cond = objectives.common.drop_labels(batch["label"], drop_key, 0.1, NUM_CLASSES)
  level = jnp.full((32,), objective.num_levels, jnp.int32)
  got, _ = objective.loss_at(params, objective.interpolate(x, eps, t), t, level, cond,
                             objective.velocity(x, eps), model_key)
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
  # The whole loss with no bootstrap examples is flow matching on the reference's grid times.
  no_boot = make_objective(NUM_CLASSES, sigma_min=0.0, bootstrap_fraction=0.0)
  loss, metrics = no_boot.loss(params, batch, rng, 0, {"ema": {}})
  np.testing.assert_allclose(loss, metrics["flow_mse"], rtol=1e-6)
  assert float(metrics["bootstrap_fraction"]) == 0.0


def reproduce_loss(objective, params, target_params, batch, rng):
  """The objective's loss rebuilt from its draws with targets from `target_params`."""
  x, labels = batch["image"], batch["label"]
  count = int(x.shape[0] * objective.bootstrap_fraction)
  noise_key, boot_key, time_key, drop_key, model_key = jax.random.split(rng, 5)
  eps = jax.random.normal(noise_key, x.shape)
  boot = objective.bootstrap_batch(target_params, x[:count], eps[:count], labels[:count],
                                   boot_key)
  flow = objective.flow_batch(x[count:], eps[count:], time_key)
  x_t, t, level, target = (jnp.concatenate(p) for p in zip(boot, flow))
  cond = jnp.concatenate([labels[:count], objectives.common.drop_labels(
      labels[count:], drop_key, objective.label_dropout, NUM_CLASSES)])
  return objective.loss_at(params, x_t, t, level, cond, target, model_key)[0], boot[3]


def test_targets_use_the_ema_parameters_and_are_clipped():
  objective = make_objective(NUM_CLASSES, bootstrap_fraction=0.5, target_clip=0.5, guidance=1.5,
                             target_ema="0.999")
  params, ema = random_params(objective, 4), random_params(objective, 5, scale=3.0)
  batch, rng = labelled_batch(6), jax.random.key(8)
  view = {"ema": {"0.999": ema, "0.9999": params}}
  # Of several EMAs none is "the first" (pytrees sort dict keys): the choice must be named.
  with pytest.raises(ValueError, match="set objective.target_ema"):
    shortcut.Shortcut(**{**objective.__dict__, "target_ema": ""}).loss(
        params, batch, rng, 0, view)
  only = shortcut.Shortcut(**{**objective.__dict__, "target_ema": ""})
  np.testing.assert_allclose(only.loss(params, batch, rng, 0, {"ema": {"0.999": ema}})[0],
                             objective.loss(params, batch, rng, 0, view)[0], rtol=1e-6)
  loss, metrics = objective.loss(params, batch, rng, 0, view)
  with_ema, target = reproduce_loss(objective, params, ema, batch, rng)
  with_current, _ = reproduce_loss(objective, params, params, batch, rng)
  np.testing.assert_allclose(loss, with_ema, rtol=1e-6)
  assert abs(float(loss) - float(with_current)) > 1e-3
  # target_ema picks a named tree; "current" the parameters being trained.
  named = shortcut.Shortcut(**{**objective.__dict__, "target_ema": "0.9999"})
  np.testing.assert_allclose(named.loss(params, batch, rng, 0, view)[0], with_current, rtol=1e-6)
  current = shortcut.Shortcut(**{**objective.__dict__, "target_ema": "current"})
  np.testing.assert_allclose(current.loss(params, batch, rng, 0, {})[0], with_current, rtol=1e-6)
  with pytest.raises(ValueError, match="0.9999"):
    shortcut.Shortcut(**{**objective.__dict__, "target_ema": "0.5"}).loss(
        params, batch, rng, 0, view)
  # Clipped: no entry beyond 0.5, and the large EMA network reaches the bound.
  assert float(jnp.max(jnp.abs(target))) <= 0.5
  assert np.isclose(float(jnp.max(jnp.abs(target))), 0.5)
  # No gradient flows through the targets: with "current" targets the gradient is that of the
  # squared error against targets held fixed.
  grads = jax.grad(lambda p: current.loss(p, batch, rng, 0, {})[0])(params)
  held = jax.grad(lambda p: reproduce_loss(current, p, params, batch, rng)[0])(params)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(held)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert float(metrics["bootstrap_fraction"]) == 0.5


def test_sampler_one_and_finest_steps():
  """N = 1 is x_1 - s(x_1, 1, level 0); N = 128 is Euler integration of s(., ., level 7) on the
  uniform grid; the backbone gets level / 7 as its second time; other N are errors."""
  objective = make_objective(NUM_CLASSES)
  params = random_params(objective, seed=9)
  rng, cond = jax.random.key(10), jnp.arange(16) % NUM_CLASSES
  x1 = jax.random.normal(rng, (16,) + SHAPE)
  ones, zeros = jnp.ones((16,)), jnp.zeros((16,), jnp.int32)
  one = objective.sample(params, rng, 16, cond, num_steps=1)
  np.testing.assert_allclose(one, x1 - objective.network(params, x1, ones, zeros, cond),
                             rtol=1e-6, atol=1e-6)
  finest = objective.sample(params, rng, 16, cond, num_steps=128)
  velocity = lambda x, t: objective.network(params, x, t, jnp.full((16,), 7), cond)
  np.testing.assert_allclose(finest, ode.solve(velocity, x1, 128, "euler"), rtol=1e-5,
                             atol=1e-5)
  assert float(jnp.max(jnp.abs(finest - one))) > 1e-3
  echo = shortcut.Shortcut(model=TimesEcho(), image_shape=SHAPE, num_classes=0)
  codes = echo.network({}, x1, ones, jnp.arange(16) % 8, None)
  np.testing.assert_allclose(codes[:, 0], (jnp.arange(16) % 8) / 7.0, rtol=1e-6)
  # level_code='log2_steps' (the reference's dt_base): the level itself, also when guided.
  echo = shortcut.Shortcut(model=TimesEcho(), image_shape=SHAPE, num_classes=0,
                           level_code="log2_steps")
  codes = echo.network({}, x1, ones, jnp.arange(16) % 8, None)
  np.testing.assert_allclose(codes[:, 0], jnp.arange(16) % 8, rtol=1e-6)
  guided = shortcut.Shortcut(model=TimesEcho(), image_shape=SHAPE, num_classes=NUM_CLASSES,
                             level_code="log2_steps", guidance=1.5)
  codes = guided.guided_shortcut({}, cond)(x1, ones, jnp.arange(16) % 8)
  np.testing.assert_allclose(codes[:, 0], jnp.arange(16) % 8, rtol=1e-6)
  with pytest.raises(ValueError, match="level_code"):
    shortcut.Shortcut(model=TimesEcho(), image_shape=SHAPE, num_classes=0, level_code="raw")
  with pytest.raises(ValueError, match="power of two"):
    objective.sample(params, rng, 4, cond, num_steps=3)
  with pytest.raises(ValueError, match="power of two"):
    objective.sample(params, rng, 4, cond, num_steps=256)


def test_tiny_toy2d_run(tmp_path):
  """The tiny run logs at step 1 the shortcut loss of the first global batch at the initial
  state (recomputed on one device with that step's key), and its trained state fits the batches
  it trained on better: their mean loss falls by over 10%."""
  spec = importlib.util.spec_from_file_location(
      "shortcut_toy2d", os.path.join(REPO, "experiments", "shortcut_toy2d.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  with config.unlocked():
    config.train.log_every = 1
  state = train.run(config, str(tmp_path))
  assert int(state.step) == config.train.steps and int(state.skipped) == 0
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == list(range(1, config.train.steps + 1))
  losses, errors = run_batch_errors(config, [None, state])
  np.testing.assert_allclose(records[0]["loss"], losses[0, 0], rtol=1e-5)
  assert errors[1].mean() < 0.9 * errors[0].mean(), errors
  assert (tmp_path / "samples" / f"step_{config.train.steps}.png").is_file()


def test_bootstrap_targets_built_by_hand_from_the_network():
  """Each bootstrap target is, by hand from the target network: s1 = s(x_t, t, l + 1), x' =
  clip(x_t - d/2 s1), s2 = s(x', t - d/2, l + 1), target = clip((s1 + s2) / 2) with d = 2^-l;
  where l + 1 is the flow-matching level L, s is guided, s_u + w (s_c - s_u), with the null label
  index for s_u; elsewhere the conditional output alone."""
  guidance, clip = 1.5, 0.8
  objective = make_objective(NUM_CLASSES, bootstrap_fraction=0.5, target_clip=clip,
                             guidance=guidance, target_ema="current")
  params = random_params(objective, 11, scale=1.5)
  batch = labelled_batch(12, size=28)
  x, labels = batch["image"], batch["label"]
  eps = jax.random.normal(jax.random.key(13), x.shape)
  x_t, t, level, target = objective.bootstrap_batch(params, x, eps, labels, jax.random.key(14))
  num_levels = objective.num_levels
  assert set(np.asarray(level).tolist()) == set(range(num_levels))  # every level, L - 1 included

  def s(x, t, finer):
    net = lambda c: np.asarray(objective.network(params, x, t, finer, c))
    conditional = net(labels)
    unconditional = net(jnp.full_like(labels, NUM_CLASSES))
    guided = unconditional + guidance * (conditional - unconditional)
    return np.where((np.asarray(finer) == num_levels)[:, None], guided, conditional)

  d = np.exp2(-np.asarray(level, np.float64))[:, None].astype(np.float32)
  finer = level + 1
  s1 = s(x_t, t, finer)
  x_mid = np.clip(np.asarray(x_t) - d / 2 * s1, -clip, clip)
  s2 = s(jnp.asarray(x_mid), t - jnp.asarray(d[:, 0] / 2), finer)
  expected = np.clip((s1 + s2) / 2, -clip, clip)
  np.testing.assert_allclose(target, expected, rtol=1e-5, atol=1e-6)
  # Guidance acts: without it the finest-level targets differ.
  plain = make_objective(NUM_CLASSES, bootstrap_fraction=0.5, target_clip=clip, guidance=1.0,
                         target_ema="current")
  unguided = plain.bootstrap_batch(params, x, eps, labels, jax.random.key(14))[3]
  finest = np.asarray(finer) == num_levels
  assert np.abs(np.asarray(unguided) - np.asarray(target))[finest].max() > 1e-3
  np.testing.assert_allclose(np.asarray(unguided)[~finest], np.asarray(target)[~finest],
                             rtol=1e-5, atol=1e-5)


def test_guided_sampling_combines_conditional_and_null_label_outputs_at_every_step():
  """Sampling with guidance w steps x_{t - d} = x_t - d (s_u + w (s_c - s_u)) at every step, with
  s_c and s_u the network's outputs for the class labels and for the null label (index
  num_classes) at that step's point, time t = 1 - k d and level log2(N): 1, 2 and 4 steps rebuilt
  by hand from the network equal sample(...); w = 1 is the conditional network alone."""
  guidance, num = 2.5, 16
  objective = make_objective(NUM_CLASSES)
  params = random_params(objective, seed=21, scale=1.0)
  rng = jax.random.key(22)
  cond = jnp.arange(num) % NUM_CLASSES
  null = jnp.full_like(cond, NUM_CLASSES)
  x1 = jax.random.normal(rng, (num,) + SHAPE)
  network = jax.jit(objective.network)

  def by_hand(num_steps, w):
    level = jnp.full((num,), int(np.log2(num_steps)), jnp.int32)
    x = np.asarray(x1, np.float64)
    for k in range(num_steps):
      t = jnp.full((num,), 1.0 - k / num_steps, jnp.float32)
      s_c = np.asarray(network(params, jnp.asarray(x, jnp.float32), t, level, cond))
      s_u = np.asarray(network(params, jnp.asarray(x, jnp.float32), t, level, null))
      x = x - (s_u + w * (s_c - s_u)) / num_steps
    return x

  sample = jax.jit(objective.sample, static_argnums=(2,),
                   static_argnames=("num_steps", "guidance"))
  for num_steps in (1, 2, 4):
    guided = sample(params, rng, num, cond, num_steps=num_steps, guidance=guidance)
    plain = sample(params, rng, num, cond, num_steps=num_steps, guidance=1.0)
    np.testing.assert_allclose(guided, by_hand(num_steps, guidance), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(plain, by_hand(num_steps, 1.0), rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(guided - plain))) > 1e-2


def test_reference_attention_scales_logits_by_one_over_head_dim():
  """model.attention_scale='inverse_dim' (the reference DiT's q / d): the layer equals softmax(q.k
  / d) v through its own projections; the default scales by 1 / sqrt(d); an unknown value is
  refused."""
  x = jax.random.normal(jax.random.key(2), (2, 5, 8))
  heads, head_dim = 2, 4
  attention = layers.Attention(heads, logit_scale="inverse_dim")
  params = nn.meta.unbox(attention.init(jax.random.key(3), x)["params"])
  project = lambda name: (x @ params[name]["kernel"] + params[name]["bias"]).reshape(
      2, 5, heads, head_dim)
  q, k, v = project("query"), project("key"), project("value")
  for module, scale in ((attention, 1.0 / head_dim),
                        (layers.Attention(heads), 1.0 / math.sqrt(head_dim))):
    weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale, axis=-1)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(2, 5, 8)
    want = y @ params["out"]["kernel"] + params["out"]["bias"]
    np.testing.assert_allclose(module.apply({"params": params}, x), want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="attention_scale"):
    layers.Attention(heads, logit_scale="inverse").init(jax.random.key(3), x)


def test_imagenet_preset_feeds_the_network_as_the_reference():
  """shortcut_imagenet: raw times (time_scale 1), the level as log2 of the step count, attention
  logits over d: the DiT built from the preset carries them."""
  config = config_lib.load_experiment(os.path.join(REPO, "experiments", "shortcut_imagenet.py"))
  model = models.build(config.model, types.SimpleNamespace(image_shape=(32, 32, 4),
                                                           num_classes=1000))
  assert (model.time_scale, model.attention_scale, model.block_init) == (
      1.0, "inverse_dim", "xavier")
  assert config.objective.level_code == "log2_steps"


def _kernel_variances(block_init, width=256):
  """{name: variance} of the initial kernels of a 2-block DiT of width D = `width`."""
  model = models.build(ml_collections.ConfigDict(dict(
      name="dit", patch_size=2, hidden_size=width, depth=2, num_heads=4,
      block_init=block_init)),
      types.SimpleNamespace(image_shape=(8, 8, 4), num_classes=10))
  x = jnp.zeros((1, 8, 8, 4))
  params = nn.meta.unbox(model.init(jax.random.key(0), x, (jnp.zeros((1,)),),
                                    jnp.zeros((1,), jnp.int32), train=False)["params"])
  block = params["block_1"]
  return {"modulation": float(jnp.var(block["adaLN_modulation"]["kernel"])),
          "query": float(jnp.var(block["attn"]["query"]["kernel"])),
          "value": float(jnp.var(block["attn"]["value"]["kernel"])),
          "mlp": float(jnp.var(block["mlp"]["fc1"]["kernel"])),
          "final": float(jnp.var(params["final"]["adaLN_modulation"]["kernel"]))}


def test_reference_block_init_draws_modulation_and_qkv_xavier_on_their_own_shapes():
  """model.block_init='xavier' (kvfrans/shortcut-models' DiT): each block's adaLN modulation
  kernel [D, 6D] is xavier-uniform (variance 2 / 7D, not DiT's zeros) and q, k, v are [D, D]
  xavier (1 / D, not the 1 / (2D) of DiT's fused qkv); the MLP and the final layer's zero
  modulation are as in DiT. An unknown value is refused."""
  width = 256
  dit, reference = _kernel_variances("adaln_zero", width), _kernel_variances("xavier", width)
  assert dit["modulation"] == 0.0 and dit["final"] == 0.0 and reference["final"] == 0.0
  np.testing.assert_allclose(reference["modulation"], 2 / (7 * width), rtol=0.05)
  np.testing.assert_allclose(reference["query"], 1 / width, rtol=0.05)
  np.testing.assert_allclose(reference["value"], 1 / width, rtol=0.05)
  np.testing.assert_allclose(dit["query"], 1 / (2 * width), rtol=0.05)
  np.testing.assert_allclose(dit["mlp"], reference["mlp"], rtol=1e-6)
  np.testing.assert_allclose(reference["mlp"], 2 / (5 * width), rtol=0.05)
  with pytest.raises(ValueError, match="block_init"):
    _kernel_variances("zero", width)
