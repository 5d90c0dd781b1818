"""CTM properties (Kim et al., arXiv:2310.02279): G(x, t, t) = x, the semigroup of the
exact Gaussian map, the flow-matching -> EDM conversion of the teacher ODE, a loss and gradient
that vanish at the exact map, targets from the EMA and the teacher, gamma-sampling, the missing
teacher error, and a tiny distillation run from a flow-matching teacher with its resume."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flowjax import checkpoint, objectives, train
from flowjax import config as config_lib
from flowjax.data import pipeline
from flowjax.objectives import ctm
from flowjax.samplers import ctm as ctm_sampler
from helpers import run_batch_errors

DIM = 3
MU = np.array([0.3, -0.5, 0.8], np.float32)


def gaussian_map(x, t, s, mu, var):
  """Exact PF-ODE map of data N(mu, var I) in sigma space: x_sigma ~ N(mu, (var + sigma^2) I) and
  the flow keeps the standardised coordinate, G(x, t, s) = mu + sqrt((var + s^2) / (var + t^2))
  (x - mu). x: [B, D]; t, s: [B]."""
  ratio = jnp.sqrt((var + s ** 2) / (var + t ** 2))[:, None]
  return mu + ratio * (x - mu)


def gaussian_denoiser(x, sigma, mu, var):
  """E[x_0 | x_sigma] = mu + var / (var + sigma^2) (x - mu) for data N(mu, var I)."""
  return mu + (var / (var + sigma ** 2))[:, None] * (x - mu)


def exact_g(x, t, s, mu, var):
  """The g that makes G = (s / t) x + (1 - s / t) g the exact map; the denoiser at s = t."""
  same = s >= t
  safe = jnp.where(same, 1.0, 1.0 - s / t)[:, None]
  g = (gaussian_map(x, t, s, mu, var) - (s / t)[:, None] * x) / safe
  return jnp.where(same[:, None], gaussian_denoiser(x, t, mu, var), g)


class GaussianVelocity(nn.Module):
  """The exact flow-matching velocity of data N(mu, var I) in flowjax time, with mu a parameter:
  x_t = (1 - t) x + t eps ~ N((1 - t) mu, s_t^2), v = -mu + (ds_t / dt) / s_t (x_t - (1 - t) mu)."""
  var: float

  @nn.compact
  def __call__(self, x, times, cond, *, train):
    del cond, train
    mu = self.param("mu", lambda key: jnp.asarray(MU))
    t = times[0][:, None]
    s_t = jnp.sqrt((1.0 - t) ** 2 * self.var + t ** 2)
    ds_t = ((t - 1.0) * self.var + t) / s_t
    return -mu + ds_t / s_t * (x - (1.0 - t) * mu)


class ExactCTMNet(nn.Module):
  """A backbone whose raw output F makes CTM's g the exact g of data N(mu, var I), with mu a
  parameter: it undoes c_in and the time embedding ln(sigma) / 4, then F = (g - c_skip x) /
  c_out."""
  var: float
  sigma_data: float = 0.5

  @nn.compact
  def __call__(self, x_in, times, cond, *, train):
    del cond, train
    mu = self.param("out", lambda key: jnp.asarray(MU))
    t, s = jnp.exp(4.0 * times[0]), jnp.exp(4.0 * times[1])
    norm = (t ** 2 + self.sigma_data ** 2)[:, None]
    x = x_in * jnp.sqrt(norm)
    g = exact_g(x, t, s, mu, self.var)
    c_skip = self.sigma_data ** 2 / norm
    c_out = t[:, None] * self.sigma_data / jnp.sqrt(norm)
    return (g - c_skip * x) / c_out


class TinyBackbone(nn.Module):
  """A small smooth stand-in for the backbone contract: Dense -> tanh -> Dense -> Dense ('out')
  on [x, times]."""

  @nn.compact
  def __call__(self, x, times, cond, *, train):
    del cond, train
    features = jnp.concatenate([x] + [t[:, None] for t in times], axis=-1)
    h = jnp.tanh(nn.Dense(16, name="hidden")(features))
    return nn.Dense(x.shape[-1], name="out")(h)


def make_ctm(model=None, teacher=None, **overrides):
  settings = dict(num_scales=8, max_heun_steps=3, heun_step_strategy="uniform")
  settings.update(overrides)
  return ctm.CTM(model=model or TinyBackbone(), image_shape=(DIM,), num_classes=0,
                 teacher_model=teacher or TinyBackbone(), **settings)


def init_params(objective, seed=0):
  """(student params, teacher params), unboxed."""
  init = jax.jit(lambda key: nn.meta.unbox(objective.init(key, {"image": jnp.zeros((1, DIM))})))
  params, extra = init(jax.random.key(seed))
  return params, extra["teacher"]


def random_points(seed, n=16, scale=1.0):
  return scale * jax.random.normal(jax.random.key(seed), (n, DIM))


def test_trajectory_map_is_the_identity_at_s_equals_t():
  """G(x, t, t) = x exactly, and G reaches x continuously as s rises to t: at the float32
  just below t (where the s == t guard does not apply) G is x to float32 rounding, and below
  that (G(x, t, s) - x) / (1 - s / t) = g(x, t, s) - x, the slope of G = (s / t) x +
  (1 - s / t) g."""
  objective = make_ctm()
  params, _ = init_params(objective)
  x = random_points(0, scale=5.0)
  t = jnp.exp(jax.random.uniform(jax.random.key(1), (16,), minval=-6.0, maxval=4.3))
  G = jax.jit(lambda p, x, t, s: objective.trajectory_map(p, x, t, s, None))
  g = jax.jit(lambda p, x, t, s: objective.g_fn(p, x, t, s, None))
  np.testing.assert_array_equal(G(params, x, t, t), x)
  below = jnp.nextafter(t, 0.0)
  assert np.all(np.asarray(below) < np.asarray(t))
  scale = np.abs(np.asarray(x)) + np.abs(np.asarray(g(params, x, t, below)))
  assert np.all(np.abs(np.asarray(G(params, x, t, below) - x)) <= 1e-6 * scale)
  for gap in (1e-2, 1e-3):
    s = t * (1.0 - gap)
    slope = (G(params, x, t, s) - x) / (1.0 - s / t)[:, None]
    np.testing.assert_allclose(slope, g(params, x, t, s) - x, rtol=1e-3, atol=5e-3)


def test_exact_g_in_the_parameterisation_is_the_gaussian_map_and_a_semigroup():
  objective = make_ctm()
  var = 0.25
  x = random_points(2, scale=3.0)
  t = jnp.full((16,), 40.0)
  u = jnp.linspace(0.5, 30.0, 16)
  s = jnp.linspace(0.002, 0.4, 16)
  G = jax.jit(lambda x, t, s: objective.parameterize(x, exact_g(x, t, s, MU, var), t, s))
  np.testing.assert_allclose(G(x, t, s), gaussian_map(x, t, s, MU, var), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(G(G(x, t, u), u, s), G(x, t, s), rtol=1e-5, atol=1e-5)
  # A wrong g (the denoiser at every s) breaks it.
  wrong = jax.jit(lambda x, t, s: objective.parameterize(x, gaussian_denoiser(x, t, MU, var), t,
                                                         s))
  assert np.max(np.abs(wrong(wrong(x, t, u), u, s) - wrong(x, t, s))) > 1e-2


def test_flow_matching_velocity_converts_to_the_edm_ode():
  """(x_sigma + v) / (1 + sigma) at x_t = x_sigma / (1 + sigma), t = sigma / (1 + sigma) equals
  EDM's (x_sigma - D(x_sigma)) / sigma for the exact Gaussian velocity and denoiser."""
  var = 0.3
  teacher = GaussianVelocity(var=var)
  teacher_params = {"mu": jnp.asarray(MU)}
  velocity = lambda x, t: teacher.apply({"params": teacher_params}, x, (t,), None, train=False)
  x = random_points(3, scale=4.0)
  sigma = jnp.exp(jnp.linspace(-6.0, 4.3, 16))
  # (x - D(x)) / sigma with the cancellation done by hand: (x - mu) sigma / (var + sigma^2).
  expected = (x - MU) * (sigma / (var + sigma ** 2))[:, None]
  np.testing.assert_allclose(ctm.edm_derivative(velocity, x, sigma), expected, rtol=1e-4,
                             atol=1e-5)


@pytest.mark.parametrize("var", [0.0, 0.25])
def test_teacher_heun_lands_on_the_exact_solution(var):
  """Point-mass data: the trajectory is a straight line in sigma, so Heun is exact. Gaussian
  data: Heun's error falls with the square of the step, and a fine grid lands on the exact map."""
  x0 = random_points(4, scale=2.0)
  errors = []
  for num_scales in (40, 80, 160):
    objective = make_ctm(teacher=GaussianVelocity(var=var), num_scales=num_scales,
                         max_heun_steps=num_scales - 1)
    teacher_params = {"mu": jnp.asarray(MU)}
    n_t = jnp.zeros((16,), jnp.int32)
    sigma_t = objective.noise_level(n_t)
    x_t = MU + jnp.sqrt(var + sigma_t[:, None] ** 2) * x0
    solve = jax.jit(lambda x: objective.teacher_solve(teacher_params, x, n_t, num_scales - 1,
                                                      None))
    exact = gaussian_map(x_t, sigma_t, jnp.full((16,), objective.sigma_min), MU, var)
    # Relative to the size of x_t at sigma_max = 80.
    errors.append(float(jnp.max(jnp.abs(solve(x_t) - exact)) / jnp.max(jnp.abs(x_t))))
  if var == 0.0:
    assert max(errors) < 1e-6
  else:
    assert errors[-1] < 2e-5
    assert errors[0] / errors[2] > 8.0  # second order: about 16 for a 4x finer grid


@pytest.mark.parametrize("var, dsm_weight", [(0.0, 1.0), (0.25, 0.0)])
def test_loss_and_gradient_vanish_at_the_exact_map(var, dsm_weight):
  """With the exact map as student and target and the exact teacher, the CTM term vanishes (up to
  Heun's error on a fine grid); for point-mass data the DSM term with its adaptive weight too."""
  objective = make_ctm(model=ExactCTMNet(var=var), teacher=GaussianVelocity(var=var),
                       num_scales=400, max_heun_steps=1, heun_step_strategy="fixed",
                       dsm_weight=dsm_weight, dsm_balance="adaptive")
  params = {"out": jnp.asarray(MU)}
  teacher = {"mu": jnp.asarray(MU)}
  x = MU + math.sqrt(var) * random_points(5, n=32)
  batch = {"image": x}
  view = lambda ema: {"ema": {"0.999": ema}, "extra": {"teacher": teacher}, "step": 0}
  value_and_grad = jax.jit(jax.value_and_grad(objective.loss, has_aux=True))
  (loss, _), grads = value_and_grad(params, batch, jax.random.key(6), 0, view(params))
  assert float(loss) < 1e-6
  assert float(jnp.max(jnp.abs(grads["out"]))) < 2e-3
  shifted = {"out": jnp.asarray(MU + 0.3)}
  (loss_off, _), grads_off = value_and_grad(shifted, batch, jax.random.key(6), 0, view(params))
  assert float(loss_off) > 1e-3 and float(jnp.max(jnp.abs(grads_off["out"]))) > 1e-2


def target_inputs(objective, seed=7):
  x_t = random_points(seed, scale=3.0)
  n_t = jnp.array([0, 1, 2, 3] * 4, jnp.int32)
  n_s = n_t + 2 + jnp.array([0, 1, 2] * 5 + [0], jnp.int32)
  return x_t, n_t, 2, jnp.minimum(n_s, objective.num_scales - 1)


def test_targets_come_from_the_ema_and_the_teacher():
  objective = make_ctm()
  params, teacher = init_params(objective, 0)
  other_params, other_teacher = init_params(objective, 1)
  ema = jax.tree.map(lambda p: p + 0.1, params)
  x_t, n_t, k, n_s = target_inputs(objective)
  target = jax.jit(lambda p, e, tp: objective.targets(p, e, tp, x_t, n_t, k, n_s, None, None))
  reference = target(params, ema, teacher)
  # The current parameters do not enter the target; the EMA and the teacher do.
  np.testing.assert_array_equal(target(other_params, ema, teacher), reference)
  assert np.max(np.abs(target(params, params, teacher) - reference)) > 1e-4
  assert np.max(np.abs(target(params, ema, other_teacher) - reference)) > 1e-4
  # And the loss reads them from the view.
  batch = {"image": random_points(8)}
  loss = jax.jit(lambda e, tp: objective.loss(params, batch, jax.random.key(9), 0,
                                              {"ema": {"0.999": e}, "extra": {"teacher": tp},
                                               "step": 0})[0])
  assert abs(float(loss(ema, teacher)) - float(loss(params, teacher))) > 1e-6
  assert abs(float(loss(ema, teacher)) - float(loss(ema, other_teacher))) > 1e-6


def test_model_sg_target_uses_the_parameters_without_gradient():
  objective = make_ctm(target_inner="model_sg")
  params, teacher = init_params(objective, 0)
  other_params, _ = init_params(objective, 1)
  x_t, n_t, k, n_s = target_inputs(objective)
  target = lambda p: objective.targets(p, params, teacher, x_t, n_t, k, n_s, None, None)
  assert np.max(np.abs(jax.jit(target)(other_params) - jax.jit(target)(params))) > 1e-4
  grads = jax.jit(jax.grad(lambda p: jnp.sum(target(p))))(params)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))


def test_adaptive_weight_is_the_ratio_of_output_weight_gradient_norms():
  """The ratio of the two terms' gradient norms on the output layer's weight (its kernel, not
  its bias, as CTM's code uses the last layer's weight)."""
  objective = make_ctm()
  params, _ = init_params(objective)
  x = random_points(10)
  terms = lambda p: (jnp.sum(objective.g_fn(p, x, jnp.ones(16), jnp.ones(16), None) ** 2),
                     jnp.sum(objective.g_fn(p, x, jnp.full(16, 3.0), jnp.ones(16), None)))
  assert objective.output_layer(params) == ("out", "kernel")
  with_bias = lambda i: jax.grad(lambda out: terms({**params, "out": out})[i])(params["out"])
  norm = lambda i: jnp.linalg.norm(with_bias(i)["kernel"])
  balance = jax.jit(lambda p: objective.adaptive_balance(terms, p))(params)
  np.testing.assert_allclose(balance, jax.jit(lambda: norm(0) / (norm(1) + 1e-4))(), rtol=1e-5)
  # The bias gradients would change it: the kernel-only ratio is not the whole layer's.
  whole = lambda i: optax.global_norm(with_bias(i))
  assert abs(float(jax.jit(lambda: whole(0) / (whole(1) + 1e-4))()) - float(balance)) > (
      1e-3 * float(balance))


def test_adaptive_layer_resolves_dit_final_and_explicit_paths():
  objective = make_ctm()
  params = {"final": {"adaLN_modulation": {"kernel": 1}, "linear": {"kernel": 2, "bias": 3}},
            "dec_aux_conv": {"kernel": 4, "bias": 5}}
  assert objective.output_layer(params) == ("final", "linear", "kernel")
  assert make_ctm(adaptive_layer="dec_aux_conv").output_layer(params) == ("dec_aux_conv",
                                                                           "kernel")
  assert make_ctm(adaptive_layer="final/adaLN_modulation").output_layer(params) == (
      "final", "adaLN_modulation", "kernel")
  with pytest.raises(ValueError, match="adaptive_layer='missing'"):
    make_ctm(adaptive_layer="missing").output_layer(params)


def test_deterministic_gamma_sampling_of_the_exact_map_is_step_independent():
  """gamma = 0 chains exact jumps, so by the semigroup 1 and 4 steps agree; gamma = 1 re-noises
  and differs."""
  var = 0.25
  objective = make_ctm(model=ExactCTMNet(var=var))
  params = {"out": jnp.asarray(MU)}
  fn = lambda x, t, s: objective.trajectory_map(params, x, t, s, None)
  x = objective.sigma_max * random_points(11)
  run = jax.jit(lambda steps, gamma: ctm_sampler.gamma_sample(
      fn, x, ctm_sampler.karras_grid(steps, objective.sigma_max, objective.sigma_min),
      jax.random.key(12), gamma), static_argnums=(0, 1))
  np.testing.assert_allclose(run(4, 0.0), run(1, 0.0), rtol=1e-4, atol=1e-4)
  assert np.max(np.abs(run(4, 1.0) - run(1, 0.0))) > 1e-3


def test_a_missing_teacher_names_the_command_that_trains_it(tmp_path):
  info = pipeline.DataInfo(image_shape=(2,), num_classes=0, num_examples=None)
  for workdir in ("", str(tmp_path / "nowhere")):
    with pytest.raises(ctm.TeacherError, match=r"python -m flowjax\.main --config=experiments/"):
      ctm.read_teacher(workdir, info, "ema")
  config = config_lib.load_experiment("experiments/ctm_toy2d.py", "tiny")
  with pytest.raises(ctm.TeacherError, match="teacher_workdir"):
    objectives.build(config.objective, TinyBackbone(), info)


# A tiny distillation run: fm_toy2d:tiny teaches ctm_toy2d:tiny.

@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
  root = tmp_path_factory.mktemp("ctm")
  devices = jax.devices()[:1]
  fm = config_lib.load_experiment("experiments/fm_toy2d.py", "tiny",
                                  **{"train.steps": 2, "sample.num": 16})
  train.run(fm, str(root / "teacher"), devices=devices)
  config = config_lib.load_experiment(
      "experiments/ctm_toy2d.py", "tiny",
      **{"objective.teacher_workdir": str(root / "teacher"), "train.steps": 2, "sample.num": 16,
         "train.log_every": 1})
  state = train.run(config, str(root / "ctm"), devices=devices)
  return root, config, state


def test_tiny_run_holds_the_teacher_checkpoint_in_its_state(distilled):
  """The state holds the teacher's EMA weights; the run logs at step 1 the CTM loss and error of
  the first global batch at the initial state with that teacher (recomputed on one device with
  that step's key), and its trained state fits the batches it trained on better: their mean CTM
  error falls by over 5%."""
  root, config, state = distilled
  assert int(state.step) == config.train.steps and int(state.skipped) == 0
  setup = train.build(config, jax.devices()[:1])
  saved, _ = checkpoint.restore_params(str(root / "teacher"), setup.abstract_state.extra["teacher"],
                                       key=("ema", "0.999"))
  raw, _ = checkpoint.restore_params(str(root / "teacher"), setup.abstract_state.extra["teacher"])
  for a, b in zip(jax.tree.leaves(state.extra["teacher"]), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The EMA teacher was loaded, not the raw parameters (they differ after two updates).
  assert any(np.max(np.abs(np.asarray(a) - np.asarray(b))) > 0
             for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(raw)))
  records = [json.loads(line) for line in (root / "ctm" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == list(range(1, config.train.steps + 1))
  losses, errors = run_batch_errors(config, [None, state])
  np.testing.assert_allclose(records[0]["loss"], losses[0, 0], rtol=1e-5)
  np.testing.assert_allclose(records[0]["error"], errors[0, 0], rtol=1e-5)
  assert errors[1].mean() < 0.95 * errors[0].mean(), errors


def test_resume_restores_the_teacher_without_loading_it_again(distilled, monkeypatch):
  root, config, state = distilled
  calls = []
  load_extra = ctm.CTM.load_extra
  monkeypatch.setattr(ctm.CTM, "load_extra",
                      lambda self, abstract: calls.append(1) or load_extra(self, abstract))
  setup = train.build(config, jax.devices()[:1])
  mngr = checkpoint.manager(str(root / "ctm"), config.ckpt)
  resumed, _, step = train.restore_or_init(setup, mngr, str(root / "ctm"))
  mngr.close()
  assert step == config.train.steps and not calls
  for a, b in zip(jax.tree.leaves(resumed.extra), jax.tree.leaves(state.extra)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A fresh start does load it.
  fresh = checkpoint.manager(str(root / "fresh"), config.ckpt)
  train.restore_or_init(setup, fresh, str(root / "fresh"))
  fresh.close()
  assert calls == [1]


@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_grid_indices_follow_their_laws(num_steps):
  """n_t ~ U{0 .. N - 1 - k} and n_s | n_t ~ U{n_t + k .. N - 1} (sony/ctm's uniform t and s
  draws): every allowed pair appears with its probability, and no other pair appears."""
  objective = make_ctm(num_scales=6)
  draws = 60_000
  n_t, n_s = jax.jit(objective.sample_indices, static_argnums=(1, 2))(
      jax.random.key(7), draws, num_steps)
  n_t, n_s = np.asarray(n_t), np.asarray(n_s)
  last = objective.num_scales - 1
  counts = {}
  for a, b in zip(n_t, n_s):
    counts[(int(a), int(b))] = counts.get((int(a), int(b)), 0) + 1
  expected = {}
  for a in range(last - num_steps + 1):
    for b in range(a + num_steps, last + 1):
      expected[(a, b)] = 1.0 / (last - num_steps + 1) / (last + 1 - a - num_steps)
  assert set(counts) == set(expected)
  for pair, probability in expected.items():
    assert abs(counts[pair] / draws - probability) < 4 * np.sqrt(probability / draws) + 1e-3, pair


def test_distances_by_hand():
  """l2: the mean squared difference per example; pseudo_huber: sqrt(||a - b||^2 + c^2) - c with
  c = huber_c, or 0.00054 sqrt(D) (iCT's rule) when huber_c = 0."""
  a = jnp.asarray([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 2.0, 0.0]])
  b = jnp.asarray([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
  np.testing.assert_allclose(make_ctm(distance="l2").distance_fn(a, b), [0.0, 9.0 / 4],
                             rtol=1e-6)
  c = 0.00054 * 2.0
  np.testing.assert_allclose(make_ctm(distance="pseudo_huber").distance_fn(a, b),
                             [0.0, np.sqrt(9.0 + c * c) - c], rtol=1e-6)
  np.testing.assert_allclose(make_ctm(distance="pseudo_huber", huber_c=0.5).distance_fn(a, b),
                             [0.0, np.sqrt(9.25) - 0.5], rtol=1e-6)


# Conditional CTM: class labels for the student, and a classifier-free guided teacher.

NUM_CLASSES = 3


class LabelledBackbone(nn.Module):
  """TinyBackbone with a one-hot class label among its inputs (cond None and the null label
  num_classes both give the null class)."""
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x, times, cond, *, train):
    del train
    labels = jnp.full(x.shape[:1], self.num_classes) if cond is None else cond
    features = jnp.concatenate([x] + [t[:, None] for t in times]
                               + [3.0 * jax.nn.one_hot(labels, self.num_classes + 1)], axis=-1)
    h = jnp.tanh(nn.Dense(16, name="hidden")(features))
    return nn.Dense(x.shape[-1], name="out")(h)


def make_conditional_ctm(**overrides):
  settings = dict(num_scales=8, max_heun_steps=3, heun_step_strategy="uniform",
                  teacher_guidance=2.5)
  settings.update(overrides)
  return ctm.CTM(model=LabelledBackbone(), image_shape=(DIM,), num_classes=NUM_CLASSES,
                 teacher_model=LabelledBackbone(), **settings)


def init_conditional_params(objective, seed=0):
  """(student params, teacher params), unboxed, for labelled batches."""
  batch = {"image": jnp.zeros((1, DIM)), "label": jnp.zeros((1,), jnp.int32)}
  init = jax.jit(lambda key: nn.meta.unbox(objective.init(key, batch)))
  params, extra = init(jax.random.key(seed))
  return params, extra["teacher"]


def karras_sigma(objective, n):
  """sigma_n of the Karras grid, in float64 from the class docstring's formula."""
  high, low = objective.sigma_max ** (1 / objective.rho), objective.sigma_min ** (1 / objective.rho)
  return (high + np.asarray(n, np.float64) / (objective.num_scales - 1) * (low - high)) ** (
      objective.rho)


def test_teacher_guidance_in_the_target_is_the_guided_teacher_network():
  """The teacher's velocity is v_u + w (v_c - v_u) (w = teacher_guidance) of the teacher
  network's outputs for the true labels (v_c) and for the null label num_classes (v_u); its Heun
  steps in sigma space follow dx / dsigma = (x + v(x / (1 + sigma), sigma / (1 + sigma))) /
  (1 + sigma); and the target G^-(G^-(x_u, u, s), s, sigma_min) applies the EMA student to the
  student's labels (here some null) while the teacher sees the true labels. All rebuilt by hand
  from the teacher network."""
  guidance = 2.5
  objective = make_conditional_ctm(teacher_guidance=guidance)
  params, teacher = init_conditional_params(objective, 0)
  ema = jax.tree.map(lambda p: p + 0.05, params)
  x_t, n_t, k, n_s = target_inputs(objective)
  labels = jnp.arange(16, dtype=jnp.int32) % NUM_CLASSES
  cond = jnp.where(jnp.arange(16) % 4 == 0, NUM_CLASSES, labels)
  null = jnp.full_like(labels, NUM_CLASSES)
  teacher_net = jax.jit(lambda x, t, c: objective.teacher_model.apply(
      {"params": teacher}, x, (t,), c, train=False))

  def velocity(x, t, w):
    v_c = np.asarray(teacher_net(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32),
                                 labels), np.float64)
    v_u = np.asarray(teacher_net(jnp.asarray(x, jnp.float32), jnp.asarray(t, jnp.float32),
                                 null), np.float64)
    return v_u + w * (v_c - v_u)

  def derivative(x, sigma, w):
    one_plus = (1.0 + sigma)[:, None]
    return (x + velocity(x / one_plus, sigma / (1.0 + sigma), w)) / one_plus

  def heun(w):
    x = np.asarray(x_t, np.float64)
    for m in range(k):
      sigma, sigma_next = karras_sigma(objective, n_t + m), karras_sigma(objective, n_t + m + 1)
      h = (sigma_next - sigma)[:, None]
      d = derivative(x, sigma, w)
      x = x + 0.5 * h * (d + derivative(x + h * d, sigma_next, w))
    return x

  # The guided velocity itself.
  t = jnp.linspace(0.05, 0.95, 16)
  guided = jax.jit(lambda x, t: objective.teacher_velocity(teacher, labels)(x, t))(x_t, t)
  np.testing.assert_allclose(guided, velocity(x_t, t, guidance), rtol=1e-5, atol=1e-5)
  assert np.max(np.abs(velocity(x_t, t, guidance) - velocity(x_t, t, 1.0))) > 1e-2
  # The teacher's Heun steps along the grid.
  solve = jax.jit(lambda x: objective.teacher_solve(teacher, x, n_t, k, labels))
  x_u = heun(guidance)
  np.testing.assert_allclose(solve(x_t), x_u, rtol=1e-4, atol=1e-4)
  assert np.max(np.abs(x_u - heun(1.0))) > 1e-2
  # The target: the EMA student's two jumps with the student's labels from the teacher's x_u.
  target = jax.jit(lambda: objective.targets(params, ema, teacher, x_t, n_t, k, n_s, cond,
                                             labels))()
  sigma_u = jnp.asarray(karras_sigma(objective, n_t + k), jnp.float32)
  sigma_s = jnp.asarray(karras_sigma(objective, n_s), jnp.float32)
  G = jax.jit(lambda x, t, s, c: objective.trajectory_map(ema, x, t, s, c))
  y = G(jnp.asarray(x_u, jnp.float32), sigma_u, sigma_s, cond)
  expected = G(y, sigma_s, jnp.full_like(sigma_s, objective.sigma_min), cond)
  np.testing.assert_allclose(target, expected, rtol=1e-4, atol=1e-4)
  # teacher_guidance = 1 is the conditional teacher alone.
  plain = make_conditional_ctm(teacher_guidance=1.0)
  np.testing.assert_allclose(
      jax.jit(lambda x: plain.teacher_solve(teacher, x, n_t, k, labels))(x_t), heun(1.0),
      rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("label_dropout", [0.0, 0.5])
def test_conditional_loss_gives_the_student_dropped_labels_and_the_teacher_true_ones(
    label_dropout):
  """The conditional loss, rebuilt from its draws: each student label is the null label
  num_classes with probability label_dropout (none at 0) and the student, its EMA target maps
  and its DSM term see those labels, while the guided teacher sees the true labels. Giving the
  teacher the dropped labels, or the student the true ones, changes the loss."""
  objective = make_conditional_ctm(label_dropout=label_dropout, dsm_balance="fixed",
                                   dsm_weight=0.5)
  params, teacher = init_conditional_params(objective, 2)
  ema = jax.tree.map(lambda p: p - 0.05, params)
  batch_size = 64
  keys = jax.random.split(jax.random.key(20), 2)
  labels = jax.random.randint(keys[0], (batch_size,), 0, NUM_CLASSES)
  batch = {"image": jax.random.normal(keys[1], (batch_size, DIM)), "label": labels}
  view = {"ema": {"0.999": ema}, "extra": {"teacher": teacher}, "step": 0}
  rng = jax.random.key(21)
  loss, metrics = jax.jit(objective.loss)(params, batch, rng, 0, view)

  heun_key, index_key, noise_key, dsm_key, drop_key, model_key = jax.random.split(rng, 6)
  num_steps = int(objective.sample_heun_steps(heun_key))
  n_t, n_s = objective.sample_indices(index_key, batch_size, num_steps)
  eps = jax.random.normal(noise_key, (batch_size, DIM))
  dropped = np.asarray(jax.random.bernoulli(drop_key, label_dropout, (batch_size,)))
  cond = jnp.where(dropped, NUM_CLASSES, labels)
  if label_dropout == 0.0:
    assert not dropped.any()
  else:
    assert 0.3 < dropped.mean() < 0.7

  @jax.jit
  def by_hand(student_cond, teacher_cond):
    """(ctm, dsm) terms from the documented formulas, with the given labels."""
    sigma_t, sigma_s = objective.noise_level(n_t), objective.noise_level(n_s)
    x = batch["image"]
    x_t = x + sigma_t[:, None] * eps
    target = objective.targets(params, ema, teacher, x_t, n_t, num_steps, n_s, student_cond,
                               teacher_cond)
    estimate = objective.trajectory_map(params, x_t, sigma_t, sigma_s, student_cond)
    estimate = objective.trajectory_map(ema, estimate, sigma_s,
                                        jnp.full_like(sigma_s, objective.sigma_min),
                                        student_cond)
    ctm_term = jnp.mean(jnp.square(estimate - target))
    sigma_key, dsm_noise_key = jax.random.split(dsm_key)
    sigma = objective.dsm_noise_levels(sigma_key, batch_size)
    x_dsm = x + sigma[:, None] * jax.random.normal(dsm_noise_key, x.shape)
    weight = (sigma ** 2 + objective.sigma_data ** 2) / (sigma * objective.sigma_data) ** 2
    denoised = objective.g_fn(params, x_dsm, sigma, sigma, student_cond)
    dsm_term = jnp.mean(weight * jnp.mean(jnp.square(denoised - x), axis=1))
    return ctm_term, dsm_term

  ctm_term, dsm_term = by_hand(cond, labels)
  np.testing.assert_allclose(metrics["ctm"], ctm_term, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(metrics["dsm"], dsm_term, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(loss, ctm_term + 0.5 * dsm_term, rtol=1e-5, atol=1e-8)
  total = lambda student_cond, teacher_cond: float(
      jnp.dot(jnp.asarray([1.0, 0.5]), jnp.asarray(by_hand(student_cond, teacher_cond))))
  differs = lambda value: abs(value - float(loss)) > 1e-3 * float(loss)
  # The labels matter: null labels everywhere give another loss.
  null = jnp.full_like(labels, NUM_CLASSES)
  assert differs(total(null, null)) and differs(total(cond, null))
  if label_dropout > 0:
    assert differs(total(cond, cond)) and differs(total(labels, labels))
