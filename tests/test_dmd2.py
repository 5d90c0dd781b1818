"""DMD2 (arXiv:2405.14867) and the parameter sets it trains: invariants, gating, resume, errors."""

import json

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn
import numpy as np
import pytest

from flowjax import config as config_lib, convert, models, optim, step as step_lib, train
from flowjax.objectives import dmd2


def gaussian_x0(mean, std):
  """E[x | x_t] for x ~ N(mean, std^2 I) on the OT path x_t = (1 - t) x + t eps."""
  def x0(x_t, t):
    a = (1.0 - t)[:, None]
    var = a ** 2 * std ** 2 + t[:, None] ** 2
    return mean + a * std ** 2 / var * (x_t - a * mean)
  return x0


def dm_grad(sample, mean_real, mean_fake, std, rng):
  """DMD's gradient at `sample` with the exact x0 of N(mean_real, std^2) as the real score
  and that of N(mean_fake, std^2) as the fake one."""
  t_key, e_key = jax.random.split(rng)
  t = jax.random.uniform(t_key, (sample.shape[0],), minval=0.02, maxval=0.98)
  x_t = (1.0 - t)[:, None] * sample + t[:, None] * jax.random.normal(e_key, sample.shape)
  return dmd2.distribution_matching_grad(sample, gaussian_x0(mean_real, std)(x_t, t),
                                         gaussian_x0(mean_fake, std)(x_t, t))


def test_distribution_matching_gradient_vanishes_at_the_data_and_points_away_from_it():
  """On Gaussians with exact scores: a generator equal to the data gets a zero gradient; one
  shifted by d gets a mean gradient along +d (G - lr grad moves towards the data), whose size
  grows with |d|."""
  rng = jax.random.key(0)
  mean = jnp.array([0.5, -1.0])
  sample = mean + 0.7 * jax.random.normal(rng, (4096, 2))
  np.testing.assert_array_equal(dm_grad(sample, mean, mean, 0.7, rng), 0.0)
  sizes = []
  for shift in (0.2, 0.8):
    d = jnp.array([shift, -shift])
    grad = dm_grad(sample + d, mean, mean + d, 0.7, jax.random.key(1)).mean(axis=0)
    cosine = jnp.dot(grad, d) / (jnp.linalg.norm(grad) * jnp.linalg.norm(d))
    assert cosine > 0.99, (shift, grad)
    sizes.append(float(jnp.linalg.norm(grad)))
  assert sizes[1] > 2 * sizes[0]


def test_gradient_is_normalised_per_example_by_the_real_residual():
  x = jnp.array([[1.0, 2.0], [0.0, 0.0]])
  real = jnp.array([[0.0, 0.0], [1.0, 3.0]])
  fake = jnp.array([[0.5, 2.0], [1.0, 1.0]])
  want = np.array([[0.5 / 1.5, 2.0 / 1.5], [0.0, -2.0 / 2.0]])
  np.testing.assert_allclose(dmd2.distribution_matching_grad(x, real, fake), want, rtol=1e-6)


def mlp_objective(**fields):
  """DMD2 on 2-D data with an MLP, the teacher the same network (no workdir needed)."""
  config = models.default_config("mlp")
  config.update(dict(hidden_size=64, depth=2))
  info = type("Info", (), dict(image_shape=(2,), num_classes=fields.pop("num_classes", 0)))()
  model = models.build(config, info)
  return dmd2.DMD2(model=model, image_shape=(2,), num_classes=info.num_classes,
                   teacher_model=model, **fields)


def zero_output(params):
  """The MLP's last layer set to zero: velocity 0, so G(z) = z ~ N(0, I)."""
  return {**params, "out": jax.tree.map(jnp.zeros_like, params["out"])}


def train_steps(objective, params, teacher, num_steps, start=0, lr=1e-3, optim_keys=None,
                every_state=True):
  """(states after each step, metrics of each step) of the train step from step `start`, on
  batches of 256 zeros (DMD2 reads only their shape: its inputs are generator samples). With
  every_state=False, the list holds the last state only."""
  c = config_lib.base_config().optim
  c.update(dict(lr=lr, grad_clip=0.0, ema_decays=(0.99,), **(optim_keys or {})))
  tx, schedules = optim.build_for(objective, c, num_steps)
  state = train.TrainState(step=jnp.asarray(start, jnp.int32), params=params,
                           opt_state=tx.init(params),
                           ema=optim.init_ema(optim.ema_params(objective, params), c.ema_decays),
                           extra={"teacher": teacher, **objective.kept_state()},
                           skipped=jnp.zeros((), jnp.int32))
  step = jax.jit(step_lib.make_train_step(objective, tx, schedules, c,
                                          ml_collections.ConfigDict(dict(grad_accum_steps=1)),
                                          jax.random.key(7)))
  data = {"image": jnp.zeros((256, 2))}
  states, history = [], []
  for i in range(num_steps):
    state, metrics = step(state, data)
    if every_state or i == num_steps - 1:
      states.append(jax.device_get(state))
    history.append(metrics)
  return states, jax.device_get(history)


def initial(objective, seed=0):
  params, extra = objective.init(jax.random.key(seed), {"image": jnp.zeros((1, 2))})
  return nn.meta.unbox(params), nn.meta.unbox(extra["teacher"])


def changed(a, b) -> bool:
  return any(np.any(np.asarray(x) != np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_fake_score_trained_on_a_fixed_generator_reaches_its_closed_form_score():
  """With the generator's update never applied (G(z) = z, a zero output layer), the fake score's
  flow-matching loss on its samples drives its denoiser to E[x | x_t] of N(0, I):
  (1 - t) / ((1 - t)^2 + t^2) x_t. Before training it is far from it."""
  objective = mlp_objective(generator_update_every=10_000)
  params, teacher = initial(objective)
  params = {"generator": zero_output(params["generator"]), "fake_score": params["fake_score"]}
  x_t = jax.random.normal(jax.random.key(3), (512, 2)) * 0.9
  t = jnp.full((512,), 0.5)
  exact = gaussian_x0(jnp.zeros(2), 1.0)(x_t, t)

  def error(fake):
    x0 = x_t - t[:, None] * objective.velocity(fake, x_t, t, None)
    return float(jnp.sqrt(jnp.mean(jnp.square(x0 - exact))))

  states, _ = train_steps(objective, params, teacher, 600, lr=2e-3, every_state=False)
  assert not changed(states[-1].params["generator"], params["generator"])
  before, after = error(params["fake_score"]), error(states[-1].params["fake_score"])
  assert before > 0.3 and after < 0.08, (before, after)


def test_two_time_scale_rule_gates_the_generator_and_its_optimizer():
  """The generator changes only at the last step of each cycle of generator_update_every, the
  fake score at every step; each set's optimizer state counts its own updates."""
  objective = mlp_objective(generator_update_every=3)
  params, teacher = initial(objective)
  states, history = train_steps(
      objective, params, teacher, 7,
      optim_keys=dict(sets=dict(generator=dict(lr=1e-2, schedule="linear", final_lr=0.0),
                                fake_score=dict(lr=1e-3))))
  assert [int(h["generator_active"]) for h in history] == [0, 0, 1, 0, 0, 1, 0]
  assert int(states[-1].opt_state.count["generator"]) == 2
  assert int(states[-1].opt_state.count["fake_score"]) == 7
  # The optimizers' own step counts (Adam's bias correction, the schedule) advanced as often.
  for name, want in (("generator", 2), ("fake_score", 7)):
    counts = [int(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(
        states[-1].opt_state.inner[name])[0] if "count" in jax.tree_util.keystr(path)]
    assert counts and all(c == want for c in counts), (name, counts)
  # Schedules run on the global step for every set (DMD2's schedulers step every iteration).
  np.testing.assert_allclose([float(h["lr_generator"]) for h in history],
                             1e-2 * (1 - np.arange(7) / 7), rtol=1e-6)
  np.testing.assert_allclose([float(h["lr_fake_score"]) for h in history], 1e-3)
  before = [params] + [s.params for s in states[:-1]]
  for k, (old, new) in enumerate(zip(before, [s.params for s in states])):
    assert changed(old["generator"], new["generator"]) == (k % 3 == 2), k
    assert changed(old["fake_score"], new["fake_score"]), k


def test_ema_follows_the_generator_only():
  objective = mlp_objective(generator_update_every=1)
  params, teacher = initial(objective)
  states, _ = train_steps(objective, params, teacher, 2)
  assert set(states[-1].ema["0.99"]) == {"generator"}


def test_real_score_takes_classifier_free_guidance_on_the_teacher_velocity():
  objective = mlp_objective(num_classes=3, teacher_guidance=2.5)
  params, extra = objective.init(jax.random.key(0), {"image": jnp.zeros((1, 2)),
                                                     "label": jnp.zeros((1,), jnp.int32)})
  teacher = nn.meta.unbox(extra["teacher"])
  x = jax.random.normal(jax.random.key(1), (5, 2))
  t = jnp.linspace(0.1, 0.9, 5)
  cond = jnp.array([0, 1, 2, 1, 0])
  v_c = objective.velocity(teacher, x, t, cond)
  v_u = objective.velocity(teacher, x, t, jnp.full((5,), 3))
  want = x - t[:, None] * (v_u + 2.5 * (v_c - v_u))
  np.testing.assert_allclose(objective.real_x0(teacher, x, t, cond), want, rtol=1e-5, atol=1e-6)


def test_multistep_sampler_is_the_renoised_chain_of_generator_steps():
  """K = 3: G at t = 1, re-noise to 2/3, G, re-noise to 1/3, G."""
  objective = mlp_objective(generator_steps=3)
  params, _ = initial(objective)
  rng = jax.random.key(4)
  got = objective.sample(params, rng, 6)
  noise_key, chain_key = jax.random.split(rng)
  x = jax.random.normal(noise_key, (6, 2))
  gen = params["generator"]
  for k, (t, t_next) in enumerate([(1.0, 2 / 3), (2 / 3, 1 / 3)]):
    x0 = x - t * objective.velocity(gen, x, jnp.full((6,), t), None)
    eps = jax.random.normal(jax.random.fold_in(chain_key, k), x.shape)
    x = (1 - t_next) * x0 + t_next * eps
  want = x - (1 / 3) * objective.velocity(gen, x, jnp.full((6,), 1 / 3), None)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="guidance 1.0"):
    objective.sample(params, rng, 6, guidance=2.0)


def test_regression_loss_is_the_distance_to_the_teachers_ode_solution():
  """regression_weight w adds w mean (G(z) - ODE_teacher(z))^2 at the generator's steps."""
  objective = mlp_objective(regression_weight=0.25, regression_steps=4)
  params, teacher = initial(objective)
  step = jnp.asarray(4, jnp.int32)  # the generator's step of the first cycle of 5
  view = {"extra": {"teacher": teacher}, "ema": {}, "step": step}
  batch = {"image": jnp.zeros((8, 2))}
  loss, metrics = objective.loss(params, batch, jax.random.key(2), step, view)
  assert float(metrics["generator_active"]) == 1.0
  input_key = jax.random.split(jax.random.key(2), 3)[0]
  z = jax.random.normal(jax.random.split(input_key, 3)[1], (8, 2))
  target = objective.teacher_solution(teacher, z, None)
  g = objective.generate(params["generator"], z, jnp.ones((8,)), None)
  np.testing.assert_allclose(metrics["regression_loss"], jnp.mean(jnp.square(g - target)),
                             rtol=1e-5)
  np.testing.assert_allclose(loss, metrics["dm_loss"] + 0.25 * metrics["regression_loss"]
                             + metrics["fake_score_mse"], rtol=1e-5)


def test_unknown_parameter_set_and_key_in_optim_sets_are_refused():
  objective = mlp_objective()
  c = config_lib.base_config().optim
  c.sets = dict(critic=dict(lr=1e-3))
  with pytest.raises(ValueError, match="critic.*generator, fake_score|generator.*critic"):
    optim.build_for(objective, c, 10)
  c.sets = dict(generator=dict(learning_rate=1e-3))
  with pytest.raises(ValueError, match="learning_rate"):
    optim.build_for(objective, c, 10)
  c.sets = dict(generator=dict(lr=1e-3))
  with pytest.raises(ValueError, match="no parameter sets"):
    optim.build_for(object(), c, 10)


# Through the trainer: python -m flowjax.main's path, with a flow-matching teacher on disk.

@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  root = tmp_path_factory.mktemp("dmd2")
  fm = config_lib.load_experiment("experiments/fm_toy2d.py", "tiny", **{"train.steps": 2})
  train.run(fm, str(root / "teacher"), devices=jax.devices()[:1])
  return root


def dmd2_config(root, **overrides):
  return config_lib.load_experiment(
      "experiments/dmd2_toy2d.py", "tiny",
      **{"objective.teacher_workdir": str(root / "teacher"), "train.log_every": 1,
         "objective.generator_update_every": 2, **overrides})


def test_generator_and_fake_score_start_as_the_teacher(teacher):
  config = dmd2_config(teacher, **{"train.steps": 1})
  setup = train.build(config, jax.devices()[:1])
  from flowjax import checkpoint
  mngr = checkpoint.manager(str(teacher / "fresh"), config.ckpt)
  state, _, _ = train.restore_or_init(setup, mngr, str(teacher / "fresh"))
  mngr.close()
  saved, _ = checkpoint.restore_params(str(teacher / "teacher"),
                                       setup.abstract_state.extra["teacher"], key=("ema", "0.999"))
  for name in ("generator", "fake_score"):
    for a, b in zip(jax.tree.leaves(state.params[name]), jax.tree.leaves(saved)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(state.ema["0.999"]["generator"]), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_is_bitwise_with_both_optimizers(teacher):
  """6 steps in one go equal 3 steps, a restart from the checkpoint, and 3 more: parameters,
  both optimizer states and the EMA."""
  straight = train.run(dmd2_config(teacher, **{"train.steps": 6, "ckpt.every_steps": 3}),
                       str(teacher / "straight"), devices=jax.devices()[:1])
  train.run(dmd2_config(teacher, **{"train.steps": 3, "ckpt.every_steps": 3}),
            str(teacher / "resumed"), devices=jax.devices()[:1])
  resumed = train.run(dmd2_config(teacher, **{"train.steps": 6, "ckpt.every_steps": 3}),
                      str(teacher / "resumed"), devices=jax.devices()[:1])
  for a, b in zip(jax.tree.leaves((straight.params, straight.opt_state, straight.ema)),
                  jax.tree.leaves((resumed.params, resumed.opt_state, resumed.ema))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(resumed.opt_state.count["generator"]) == 3
  records = [json.loads(line) for line in
             (teacher / "resumed" / "metrics.jsonl").read_text().splitlines()]
  assert [r["generator_active"] for r in records] == [0.0, 1.0] * 3


def test_a_teacher_of_another_network_is_refused(teacher):
  config = dmd2_config(teacher, **{"model.hidden_size": 48})
  with pytest.raises(config_lib.ConfigError, match="model.hidden_size: 48 -> 32"):
    train.build(config, jax.devices()[:1])


def test_karras_noise_levels_follow_the_official_grid():
  """An index uniform over [20, 980] of the 1000-point Karras grid (sigma 0.002 .. 80, rho 7)
  for the distribution-matching term, over all 1000 for the fake score; OT time
  sigma / (1 + sigma)."""
  objective = mlp_objective()
  grid = np.asarray(objective.karras_times())
  sigma = (0.002 ** (1 / 7) + np.linspace(0, 1, 1000) * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
  np.testing.assert_allclose(grid, sigma / (1 + sigma), rtol=1e-5)
  dm = np.asarray(objective.noise_times(jax.random.key(0), 200_000, full=False))
  fake = np.asarray(objective.noise_times(jax.random.key(1), 200_000, full=True))
  index = lambda t: np.searchsorted(grid, t)
  assert index(dm).min() == 20 and index(dm).max() == 980
  assert index(fake).min() == 0 and index(fake).max() == 999
  assert abs(np.mean(index(dm)) - 500) < 3


class RecordedLevels(dmd2.DMD2):
  """DMD2 whose noise_times calls append (full, times) to `calls` when they run."""

  def noise_times(self, rng, batch_size, full):
    t = super().noise_times(rng, batch_size, full)
    jax.debug.callback(lambda v: self.calls.append((full, np.asarray(v))), t)
    return t


def test_fastgen_levels_draw_every_term_over_indices_2_to_998():
  """NVlabs/FastGen's DMD2 ("polynomial": an index uniform over 2 .. 998 of the same grid, for
  the distribution-matching term, the fake score and the GAN alike): min_step_percent 0.002,
  max_step_percent 0.998, fake_score_levels='dm_range'. Checked on the times each term of a
  generator step's loss draws (the GAN's real and generated inputs, the fake score's, the
  distribution-matching term's), and on many draws of each law."""
  base = mlp_objective(min_step_percent=0.002, max_step_percent=0.998,
                       fake_score_levels="dm_range", gan_weight=1e-3)
  objective = RecordedLevels(**base.__dict__)
  object.__setattr__(objective, "calls", [])
  grid = np.asarray(objective.karras_times())
  params, teacher = initial(objective)
  step = jnp.asarray(4, jnp.int32)
  view = {"extra": {"teacher": teacher}, "ema": {}, "step": step}
  jax.block_until_ready(
      objective.loss(params, {"image": jnp.zeros((4096, 2))}, jax.random.key(2), step, view))
  jax.effects_barrier()
  assert sorted(full for full, _ in objective.calls) == [False, True, True, True, True]
  for full, t in objective.calls:
    index = np.searchsorted(grid, t)
    assert index.min() >= 2 and index.max() <= 998, full
  for seed, full in ((0, False), (1, True)):
    index = np.searchsorted(grid, np.asarray(
        objective.noise_times(jax.random.key(seed), 200_000, full=full)))
    assert index.min() == 2 and index.max() == 998, full
  with pytest.raises(ValueError, match="fake_score_levels"):
    mlp_objective(fake_score_levels="grid")


class ShiftGenerator(dmd2.DMD2):
  """DMD2 whose one-step generator is G(z) = z + shift (params["generator"] = {"shift": [2]})."""

  def generate(self, params, x_t, t, cond):
    if "shift" in params:
      return x_t + params["shift"]
    return super().generate(params, x_t, t, cond)


def test_generator_loss_has_the_distribution_matching_gradient():
  """d loss / d G = grad / (number of elements): the generator moves along -grad."""
  base = mlp_objective()
  objective = ShiftGenerator(model=base.model, image_shape=(2,), num_classes=0,
                             teacher_model=base.model)
  params, teacher = initial(objective)
  _, fake = initial(objective, seed=1)
  params = {"generator": {"shift": jnp.array([0.3, -0.2])}, "fake_score": fake}
  step = jnp.asarray(4, jnp.int32)
  view = {"extra": {"teacher": teacher}, "ema": {}, "step": step}
  rng, batch = jax.random.key(5), {"image": jnp.zeros((64, 2))}
  got = jax.jit(jax.grad(lambda p: objective.loss(p, batch, rng, step, view)[0]))(params)
  input_key, dm_key, _ = jax.random.split(rng, 3)
  z = jax.random.normal(jax.random.split(input_key, 3)[1], (64, 2))
  sample = z + params["generator"]["shift"]
  t_key, e_key, _ = jax.random.split(dm_key, 3)
  t = objective.noise_times(t_key, 64, full=False)
  x_t = (1 - t[:, None]) * sample + t[:, None] * jax.random.normal(e_key, (64, 2))
  x0_fake = x_t - t[:, None] * objective.velocity(fake, x_t, t, None)
  grad = dmd2.distribution_matching_grad(sample, objective.real_x0(teacher, x_t, t, None), x0_fake)
  assert float(jnp.abs(grad).mean()) > 1e-3
  np.testing.assert_allclose(got["generator"]["shift"], grad.sum(axis=0) / grad.size, rtol=1e-4,
                             atol=1e-7)


def test_an_evaluation_computes_the_generator_terms_at_any_step():
  objective = mlp_objective()
  params, teacher = initial(objective)
  _, fake = initial(objective, seed=1)
  params = {"generator": params["generator"], "fake_score": fake}
  view = {"extra": {"teacher": teacher}, "ema": {}, "step": jnp.zeros((), jnp.int32)}
  metrics = step_lib.make_eval_step(objective, jax.random.key(0))(
      params, view, {"image": jnp.zeros((16, 2))}, 0)
  assert float(metrics["generator_active"]) == 1.0 and float(metrics["dm_loss"]) > 0


def test_every_key_of_each_set_is_a_command_line_key_and_bad_values_are_refused(teacher):
  config = dmd2_config(teacher, **{"optim.sets.fake_score.b1": 0.0,
                                   "optim.sets.generator.schedule": "cosine"})
  assert set(config.optim.sets.generator) == set(optim.SET_KEYS)
  assert optim.set_config(config.optim, "fake_score").b1 == 0.0
  assert optim.set_config(config.optim, "generator").b1 == config.optim.b1
  for key, value, message in (("name", "adamw_typo", "adamw"), ("schedule", "cosin", "cosine"),
                              ("lr", -1.0, "must be >= 0")):
    bad = dmd2_config(teacher, **{f"optim.sets.generator.{key}": value})
    with pytest.raises(config_lib.ConfigError, match=message):
      train.build(bad, jax.devices()[:1])


def test_gan_terms_are_the_softplus_losses_of_the_head_on_the_fake_scores_features():
  """gan_discriminator_loss = mean softplus(D(G)) + softplus(-D(x)) and gan_generator_loss =
  mean softplus(-D(G)), D the head on the fake score's middle-block features at noised inputs,
  recomputed with the loss's own keys; the total adds them with their weights."""
  objective = mlp_objective(gan_weight=3e-3, gan_discriminator_weight=1e-2)
  params, teacher = initial(objective)
  assert set(params["fake_score"][dmd2.GAN_HEAD]) == {"fc1", "fc2"}
  step, rng = jnp.asarray(4, jnp.int32), jax.random.key(6)
  view = {"extra": {"teacher": teacher}, "ema": {}, "step": step}
  x = jax.random.normal(jax.random.key(1), (32, 2)) + 2.0
  loss, metrics = objective.loss(params, {"image": x}, rng, step, view)
  input_key, dm_key, fake_key = jax.random.split(rng, 3)
  z = jax.random.normal(jax.random.split(input_key, 3)[1], (32, 2))
  sample = objective.generate(params["generator"], z, jnp.ones((32,)), None)
  fake = params["fake_score"]
  on_gen = objective.discriminator(fake, sample, None, jax.random.fold_in(dm_key, 1))
  real_key, gen_key = jax.random.split(jax.random.fold_in(fake_key, 1))
  on_fake = objective.discriminator(fake, sample, None, gen_key)
  on_real = objective.discriminator(fake, x, None, real_key)
  want_d = jnp.mean(jax.nn.softplus(on_fake) + jax.nn.softplus(-on_real))
  np.testing.assert_allclose(metrics["gan_discriminator_loss"], want_d, rtol=1e-5)
  np.testing.assert_allclose(metrics["gan_generator_loss"], jnp.mean(jax.nn.softplus(-on_gen)),
                             rtol=1e-5)
  np.testing.assert_allclose(loss, metrics["dm_loss"] + 3e-3 * metrics["gan_generator_loss"]
                             + metrics["fake_score_mse"] + 1e-2 * want_d, rtol=1e-5)
  with pytest.raises(ValueError, match="gan_feature_layer='nope'"):
    mlp_objective(gan_weight=1e-3, gan_feature_layer="nope").init(
        jax.random.key(0), {"image": jnp.zeros((1, 2))})


def test_discriminator_learns_to_tell_real_from_generated():
  """With the generator held at G(z) = z + 3 (never updated) and the real data at 0, the head
  and fake score trained by the discriminator loss separate them: mean D(real) - D(fake) grows
  from about 0 to over 0.3."""
  base = mlp_objective(gan_weight=1.0, gan_discriminator_weight=1.0,
                       generator_update_every=10_000)
  objective = ShiftGenerator(**{f: getattr(base, f) for f in (
      "model", "image_shape", "num_classes", "teacher_model", "gan_weight",
      "gan_discriminator_weight", "generator_update_every")})
  params, teacher = initial(objective)
  params = {"generator": {"shift": jnp.array([3.0, 3.0])}, "fake_score": params["fake_score"]}
  _, history = train_steps(objective, params, teacher, 300, lr=3e-3, every_state=False)
  gap = lambda h: float(h["d_real"] - h["d_fake"])
  assert abs(gap(history[0])) < 0.15
  assert np.mean([gap(h) for h in history[-20:]]) > 0.3, [gap(h) for h in history[-5:]]


def fdistill_objective(**fields):
  base = mlp_objective()
  return dmd2.FDistill(model=base.model, image_shape=(2,), num_classes=0,
                       teacher_model=base.model, **fields)


def test_f_divergence_weights_by_hand():
  """r = exp(logit) clipped to [0.1, 20], divided by its batch mean within its bin of t, then
  h(r) normalised to mean 1: JS r / (1 + r), KL r, reverse KL 1 (DMD)."""
  logits = jnp.array([0.0, 1.0, -1.0, 2.0, 5.0, -4.0])
  t = jnp.array([0.05, 0.08, 0.5, 0.55, 0.95, 0.91])
  r = np.clip(np.exp(np.asarray(logits)), 0.1, 20.0)
  for f, h_of in (("js", lambda r: r / (1 + r)), ("kl", lambda r: r),
                  ("reverse_kl", np.ones_like)):
    got, running = dmd2.f_divergence_weights(logits, t, f, 0.1, 20.0, 0)
    assert running is None
    want = h_of(r) / (h_of(r).mean() + 1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Two bins of t: [0, 0.5) and [0.5, 1].
    binned = r.copy()
    binned[:2] /= r[:2].mean() + 1e-6
    binned[2:] /= r[2:].mean() + 1e-6
    got, _ = dmd2.f_divergence_weights(logits, t, f, 0.1, 20.0, 2)
    np.testing.assert_allclose(got, h_of(binned) / (h_of(binned).mean() + 1e-6), rtol=1e-5)


def test_running_ratio_means_per_bin_by_hand():
  """FastGen's ratio_ema_rate: in each bin the batch reaches, running <- rate running + (1 -
  rate) batch mean, and r is divided by the updated running mean; an empty bin keeps its value;
  rate 0 is the batch mean."""
  logits = jnp.array([0.0, 1.0, -1.0, 2.0])
  t = jnp.array([0.05, 0.08, 0.5, 0.55])  # bins 0 and 2 of 4 (bins 1 and 3 empty)
  r = np.clip(np.exp(np.asarray(logits)), 0.1, 20.0)
  running = jnp.array([2.0, 3.0, 0.5, 7.0])
  got, new = dmd2.f_divergence_weights(logits, t, "kl", 0.1, 20.0, 4, running=running,
                                       ema_rate=0.5)
  want_running = np.array([0.5 * 2.0 + 0.5 * r[:2].mean(), 3.0, 0.5 * 0.5 + 0.5 * r[2:].mean(),
                           7.0])
  np.testing.assert_allclose(new, want_running, rtol=1e-5)
  normalised = r / (want_running[[0, 0, 2, 2]] + 1e-6)
  np.testing.assert_allclose(got, normalised / (normalised.mean() + 1e-6), rtol=1e-5)
  batch_only, _ = dmd2.f_divergence_weights(logits, t, "kl", 0.1, 20.0, 4)
  at_zero, _ = dmd2.f_divergence_weights(logits, t, "kl", 0.1, 20.0, 4, running=running,
                                         ema_rate=0.0)
  np.testing.assert_allclose(at_zero, batch_only, rtol=1e-6)


def test_reverse_kl_f_distill_is_dmd2_and_js_weights_each_samples_gradient():
  gan = dict(gan_weight=3e-3, gan_discriminator_weight=1e-2)
  step, rng = jnp.asarray(4, jnp.int32), jax.random.key(9)
  batch = {"image": jax.random.normal(jax.random.key(2), (32, 2))}
  reference = mlp_objective(**gan)
  params, teacher = initial(reference)
  view = {"extra": {"teacher": teacher}, "ema": {}, "step": step}
  loss_fn = lambda objective: (lambda p: objective.loss(p, batch, rng, step, view))
  # Compiled: a loss and its gradient run eagerly compile each of their many operations.
  value_and_grad = lambda objective: jax.jit(jax.value_and_grad(loss_fn(objective), has_aux=True))
  (dmd_loss, dmd_metrics), dmd_grads = value_and_grad(reference)(params)
  rkl = fdistill_objective(f_divergence="reverse_kl", **gan)
  (loss, metrics), grads = value_and_grad(rkl)(params)
  # (h = 1 / (1 + 1e-6) after the normalisation's epsilon.)
  np.testing.assert_allclose(loss, dmd_loss, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(dmd_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()) + 1e-12)
  # JS: the distribution-matching loss is 0.5 mean((h grad)^2), h from the head at x_t.
  js = fdistill_objective(f_divergence="js", **gan)
  _, metrics = jax.jit(loss_fn(js))(params)
  input_key, dm_key, _ = jax.random.split(rng, 3)
  z = jax.random.normal(jax.random.split(input_key, 3)[1], (32, 2))
  sample = js.generate(params["generator"], z, jnp.ones((32,)), None)
  t_key, e_key, _ = jax.random.split(dm_key, 3)
  t = js.noise_times(t_key, 32, full=False)
  x_t = (1 - t[:, None]) * sample + t[:, None] * jax.random.normal(e_key, (32, 2))
  fake = params["fake_score"]
  x0_fake = x_t - t[:, None] * js.velocity(fake, x_t, t, None)
  grad = dmd2.distribution_matching_grad(sample, js.real_x0(teacher, x_t, t, None), x0_fake)
  h, _ = js.sample_weights(fake, x_t, t, None, {})
  assert float(h.max() - h.min()) > 1e-3
  np.testing.assert_allclose(metrics["dm_loss"], 0.5 * jnp.mean(jnp.square(h[:, None] * grad)),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="gan_weight > 0"):
    fdistill_objective(gan_weight=0.0)


def test_running_ratio_means_change_at_generator_steps_only():
  """state.extra["ratio_bins"] starts at ones, moves at each generator step (the train step writes
  the objective's update into the state) and stays put at the fake score's steps."""
  objective = fdistill_objective(gan_weight=3e-3, ratio_ema_rate=0.5, ratio_bins=4,
                                 generator_update_every=2)
  params, teacher = initial(objective)
  states, history = train_steps(objective, params, teacher, 4)
  bins = [np.asarray(s.extra[dmd2.RATIO_MEANS]) for s in states]
  assert [float(h["generator_active"]) for h in history] == [0.0, 1.0, 0.0, 1.0]
  assert dmd2.RATIO_MEANS not in history[0] and "extra_updates" not in history[0]
  np.testing.assert_array_equal(bins[0], np.ones(4))
  assert np.all(bins[1] != 1.0)
  np.testing.assert_array_equal(bins[2], bins[1])
  assert np.any(bins[3] != bins[2])
  assert fdistill_objective(gan_weight=3e-3).kept_state() == {}
  with pytest.raises(ValueError, match="ratio_ema_rate=1.0"):
    fdistill_objective(gan_weight=3e-3, ratio_ema_rate=1.0)


def test_running_ratio_means_thread_through_accumulated_microbatches_and_skip_nonfinite():
  """With train.grad_accum_steps = 2 microbatch 1 sees microbatch 0's update of the running
  means and the step keeps microbatch 1's (not an average); a non-finite step keeps them."""
  objective = fdistill_objective(gan_weight=3e-3, ratio_ema_rate=0.5, ratio_bins=4,
                                 generator_update_every=1)
  params, teacher = initial(objective)
  c = config_lib.base_config().optim
  c.update(dict(lr=1e-3, grad_clip=0.0, ema_decays=()))
  tx, schedules = optim.build_for(objective, c, 4)
  ones = objective.kept_state()[dmd2.RATIO_MEANS]
  state = train.TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                           opt_state=tx.init(params), ema={},
                           extra={"teacher": teacher, dmd2.RATIO_MEANS: ones},
                           skipped=jnp.zeros((), jnp.int32))
  batch = {"image": jax.random.normal(jax.random.key(3), (64, 2))}
  gradient = step_lib.make_gradient(objective, ml_collections.ConfigDict(
      dict(grad_accum_steps=2)), jax.random.key(7))
  _, metrics, _ = jax.jit(gradient)(state, batch)
  got = metrics["extra_updates"][dmd2.RATIO_MEANS]
  step_key = jax.random.fold_in(jax.random.key(7), 0)
  micro = step_lib._split_microbatches(batch, 2)
  running = ones
  for index in range(2):
    view = {"extra": {"teacher": teacher, dmd2.RATIO_MEANS: running}, "ema": {},
            "step": state.step}
    mb = jax.tree.map(lambda x, index=index: x[index], micro)
    _, m = objective.loss(params, mb, jax.random.fold_in(step_key, index), state.step, view)
    assert np.any(np.asarray(m["extra_updates"][dmd2.RATIO_MEANS]) != np.asarray(running))
    running = m["extra_updates"][dmd2.RATIO_MEANS]
  np.testing.assert_allclose(got, running, rtol=1e-6)
  # A non-finite loss: the state, running means included, stays as it was.
  broken = jax.tree.map(lambda x: x * jnp.nan, params)
  train_step = jax.jit(step_lib.make_train_step(
      objective, tx, schedules, c, ml_collections.ConfigDict(dict(grad_accum_steps=1)),
      jax.random.key(7)))
  new, metrics = train_step(state.replace(params=broken), batch)
  assert int(metrics["nonfinite"]) == 1
  np.testing.assert_array_equal(np.asarray(new.extra[dmd2.RATIO_MEANS]), np.asarray(ones))


def numpy_conv(x, kernel, bias, stride, pad):
  """NHWC convolution by hand: x [B, H, W, C], kernel [k, k, C, O]."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  k = kernel.shape[0]
  out_h = (x.shape[1] - k) // stride + 1
  out_w = (x.shape[2] - k) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[3]))
  for i in range(out_h):
    for j in range(out_w):
      patch = x[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
      out[:, i, j] = np.einsum("bhwc,hwco->bo", patch, kernel)
  return out + bias


def numpy_group_norm(x, groups, scale, bias, eps=1e-5):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def test_conv_gan_head_is_the_official_branch_by_hand():
  """ConvGanHead on [B, 8, 8, C]: 4x4 stride-2 conv (padding 1) -> GroupNorm(gcd(32, C)) ->
  SiLU -> 4x4 stride-4 conv -> GroupNorm -> SiLU -> 1x1 conv, one logit per example (8 -> 4 ->
  1 positions), recomputed in NumPy from the head's parameters."""
  features = jax.random.normal(jax.random.key(0), (2, 8, 8, 64))
  head = dmd2.ConvGanHead()
  params = nn.meta.unbox(head.init(jax.random.key(1), features)["params"])
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape),
                        params)  # non-zero biases, non-unit norms
  got = head.apply({"params": params}, features)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  silu = lambda v: v / (1 + np.exp(-v))
  h = numpy_conv(np.asarray(features, np.float64), p["conv0"]["kernel"], p["conv0"]["bias"], 2, 1)
  assert h.shape == (2, 4, 4, 64)
  h = silu(numpy_group_norm(h, 32, p["norm0"]["scale"], p["norm0"]["bias"]))
  h = numpy_conv(h, p["conv1"]["kernel"], p["conv1"]["bias"], 4, 0)
  assert h.shape == (2, 1, 1, 64)
  h = silu(numpy_group_norm(h, 32, p["norm1"]["scale"], p["norm1"]["bias"]))
  want = numpy_conv(h, p["conv2"]["kernel"], p["conv2"]["bias"], 1, 0)[:, 0, 0, 0]
  assert got.shape == (2,)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_f_distill_trains_through_the_trainer_with_its_gan_head(teacher):
  """Through train.run with FastGen's running ratio means: the head in the fake score set, the
  weights logged at generator steps, and a resumed run equal to an uninterrupted one, the
  running means (checkpointed in state.extra) included."""
  def config(steps):
    return config_lib.load_experiment(
        "experiments/fdistill_toy2d.py", "tiny",
        **{"objective.teacher_workdir": str(teacher / "teacher"), "train.log_every": 1,
           "objective.generator_update_every": 2, "objective.ratio_ema_rate": 0.5,
           "train.steps": steps, "ckpt.every_steps": 2})
  state = train.run(config(4), str(teacher / "fdistill"), devices=jax.devices()[:1])
  assert dmd2.GAN_HEAD in state.params["fake_score"]
  assert np.any(np.asarray(state.extra[dmd2.RATIO_MEANS]) != 1.0)
  records = [json.loads(line) for line in
             (teacher / "fdistill" / "metrics.jsonl").read_text().splitlines()]
  generator_steps = [r for r in records if r["generator_active"] == 1.0]
  assert generator_steps and all(r["weight_max"] >= r["weight_min"] > 0 for r in generator_steps)
  assert all(np.isfinite(r["gan_discriminator_loss"]) for r in records)
  train.run(config(2), str(teacher / "fdistill_resumed"), devices=jax.devices()[:1])
  resumed = train.run(config(4), str(teacher / "fdistill_resumed"), devices=jax.devices()[:1])
  for a, b in zip(jax.tree.leaves((state.params, state.extra[dmd2.RATIO_MEANS])),
                  jax.tree.leaves((resumed.params, resumed.extra[dmd2.RATIO_MEANS]))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# The ImageNet-64 and CIFAR-10 presets: network layout, head and shardings against their teacher
# experiments, and a tiny run.

def assert_one_fsdp_sharded_network(setup, min_size):
  """Generator, fake score (without its head) and teacher have one network's shapes, and every
  kernel of at least min_size elements is sharded over fsdp."""
  params = setup.abstract_state.params
  network = lambda tree: jax.tree.map(lambda leaf: leaf.shape, tree)
  fake = {k: v for k, v in params["fake_score"].items() if k != dmd2.GAN_HEAD}
  assert network(params["generator"]) == network(fake) == network(
      setup.abstract_state.extra["teacher"])
  kernels = [leaf for leaf in jax.tree.leaves(params) if leaf.size >= min_size]
  assert kernels and all("fsdp" in jax.tree.leaves(tuple(k.sharding.spec)) for k in kernels)


@pytest.mark.parametrize("name", ["dmd2_imagenet64", "fdistill_imagenet64"])
def test_imagenet64_presets_have_the_official_bottleneck_head_and_fsdp_shardings(tmp_path, name):
  """On a 2 x 4 (data x fsdp) mesh, reading a workdir of experiments/fm_imagenet64.py as the
  teacher: generator, fake score and teacher are one network whose big kernels are fsdp-sharded;
  the GAN head reads the encoder's last 8x8 block (768 channels) through the official
  convolutional branch."""
  config = config_lib.load_experiment(f"experiments/{name}.py")
  teacher = config_lib.load_experiment("experiments/fm_imagenet64.py")
  for c in (config, teacher):
    with c.unlocked():
      c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 4, 1
      c.data.update(dict(name="synthetic", num_classes=1000))
  teacher_dir = tmp_path / "teacher"
  (teacher_dir / "checkpoints").mkdir(parents=True)
  (teacher_dir / "config.json").write_text(config_lib.to_json(teacher))
  with config.unlocked():
    config.objective.teacher_workdir = str(teacher_dir)
  setup = train.build(config)
  assert setup.objective.gan_layer() == "enc_8x8_block2"
  params = setup.abstract_state.params
  head = params["fake_score"][dmd2.GAN_HEAD]
  assert head["conv0"]["kernel"].shape == (4, 4, 768, 768)
  assert head["conv1"]["kernel"].shape == (4, 4, 768, 768)
  assert head["conv2"]["kernel"].shape == (1, 1, 768, 1)
  assert head["norm0"]["scale"].shape == (768,)
  assert_one_fsdp_sharded_network(setup, min_size=2**20)
  if name == "fdistill_imagenet64":
    assert setup.abstract_state.extra[dmd2.RATIO_MEANS].shape == (10,)


def test_cifar10_preset_distils_the_fm_cifar10_teacher_with_fastgens_settings(tmp_path):
  """dmd2_cifar10.py at full size on a 2 x 4 mesh reads experiments/fm_cifar10.py's workdir as
  its teacher (the same DDPM++ network; its dropout may differ), puts the convolutional head on
  the 8x8 bottleneck (256 channels), clips the generator's gradients only, and draws the fake
  score's noise levels from the distribution-matching range."""
  config = config_lib.load_experiment("experiments/dmd2_cifar10.py")
  teacher = config_lib.load_experiment("experiments/fm_cifar10.py")
  for c in (config, teacher):
    with c.unlocked():
      c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 4, 1
      c.data.update(dict(name="synthetic", num_classes=10))
  (tmp_path / "teacher" / "checkpoints").mkdir(parents=True)
  (tmp_path / "teacher" / "config.json").write_text(config_lib.to_json(teacher))
  with config.unlocked():
    config.objective.teacher_workdir = str(tmp_path / "teacher")
  setup = train.build(config)
  assert setup.objective.gan_layer() == "enc_8x8_block3"
  assert setup.objective.fake_score_levels == "dm_range"
  params = setup.abstract_state.params
  head = params["fake_score"][dmd2.GAN_HEAD]
  assert head["conv0"]["kernel"].shape == (4, 4, 256, 256)
  assert_one_fsdp_sharded_network(setup, min_size=2**18)
  assert (config.optim.sets.generator.grad_clip, config.optim.sets.fake_score.grad_clip) == (
      10.0, 0.0)


# Both tiny presets are the same one-level U-Net with the same head, each reading a workdir of its
# teacher experiment's tiny preset; CIFAR-10's runs FastGen's settings, so it is the one in CI
# (ImageNet-64's preset at full size is built above).
@pytest.mark.parametrize("name, teacher_experiment", [
    pytest.param("dmd2_imagenet64", "fm_imagenet64", marks=pytest.mark.slow),
    ("dmd2_cifar10", "fm_cifar10")])
def test_tiny_preset_trains_a_unet_with_the_conv_head(tmp_path, name, teacher_experiment):
  """The tiny preset through train.run from a flow-matching teacher of its own model and data:
  a U-Net generator, the convolutional head on its 8x8 bottleneck, finite terms."""
  config = config_lib.load_experiment(f"experiments/{name}.py", "tiny")
  # The teacher's workdir at its initial parameters (what a trained one holds, of this model).
  teacher = config_lib.load_experiment(f"experiments/{teacher_experiment}.py", "tiny")
  setup = train.build(teacher, devices=jax.devices()[:1])
  with train.context(setup):
    params = jax.device_get(setup.init_fn().params)
  convert.write_workdir(teacher, params, str(tmp_path / "teacher"))
  with config.unlocked():
    config.objective.teacher_workdir = str(tmp_path / "teacher")
    config.train.steps = 2
  state = train.run(config, str(tmp_path / "dmd2"), devices=jax.devices()[:1])
  assert set(state.params["fake_score"][dmd2.GAN_HEAD]) == {"conv0", "norm0", "conv1", "norm1",
                                                            "conv2"}
  records = [json.loads(line) for line in
             (tmp_path / "dmd2" / "metrics.jsonl").read_text().splitlines()]
  assert [r["generator_active"] for r in records] == [0.0, 1.0]
  assert all(np.isfinite(r["gan_discriminator_loss"]) and np.isfinite(r["dm_loss"])
             for r in records)
  assert any(r["gan_generator_loss"] > 0 for r in records)


def test_resuming_with_the_running_means_switched_on_is_refused_and_loses_nothing(teacher):
  """A checkpoint without the running ratio means, resumed (--allow_config_change) by a config
  that keeps them: one error naming state.extra and the option, the checkpoint left in place."""
  from flowjax import checkpoint

  def config(rate):
    return config_lib.load_experiment(
        "experiments/fdistill_toy2d.py", "tiny",
        **{"objective.teacher_workdir": str(teacher / "teacher"), "train.steps": 2,
           "ckpt.every_steps": 2, "objective.ratio_ema_rate": rate})
  workdir = teacher / "fdistill_switched"
  train.run(config(0.0), str(workdir), devices=jax.devices()[:1])
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"objective state[\s\S]*ratio_running_means'\]: not in the checkpoint"):
    train.run(config(0.5), str(workdir), devices=jax.devices()[:1], allow_config_change=True)
  assert (workdir / "checkpoints" / "2").is_dir()
