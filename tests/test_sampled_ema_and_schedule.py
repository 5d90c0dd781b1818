"""The EMA that samples and evaluations use is the configured one, the logged learning rate is
the applied one, and meanflow_cifar10 draws its times near the data as py-meanflow does."""

import jax
import numpy as np
import optax
import pytest

from flowjax import config as config_lib, metrics, objectives, optim, train

import test_trainer


def toy(**overrides):
  return config_lib.load_experiment("experiments/fm_toy2d.py", "tiny", **{
      "train.steps": 3, "ckpt.every_steps": 0, "sample.num": 16, "data.prefetch": 0,
      **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A run keeping three EMAs listed out of sorted order, as meanflow_cifar10 does."""
  config = toy(**{"optim.ema_decays": (0.9999, 0.99995, 0.9996)})
  state = train.run(config, str(tmp_path_factory.mktemp("ema")))
  return config, jax.device_get(state)


def same_tree(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                   strict=True))


def test_samples_use_the_first_listed_ema_by_default(trained):
  config, state = trained
  # The trained state's EMA dict comes back from jit with sorted keys: its first is 0.9996.
  assert list(state.ema) == sorted(state.ema) and next(iter(state.ema)) == "0.9996"
  assert not same_tree(state.ema["0.9999"], state.ema["0.9996"])
  assert same_tree(train.sampling_params(state, config), state.ema["0.9999"])


@pytest.mark.parametrize("decay", [0.99995, 0.9996])
def test_sample_ema_decay_picks_the_sampled_ema(trained, decay):
  config, state = trained
  config = config_lib.load_experiment("experiments/fm_toy2d.py", "tiny", **{
      "optim.ema_decays": (0.9999, 0.99995, 0.9996), "sample.ema_decay": decay})
  assert same_tree(train.sampling_params(state, config), state.ema[optim.ema_key(decay)])
  assert same_tree(train.sampling_params(state, config, use_ema=False), state.params)


def test_a_sample_ema_decay_that_is_not_kept_is_refused():
  config = toy(**{"optim.ema_decays": (0.999,), "sample.ema_decay": 0.99})
  with pytest.raises(config_lib.ConfigError, match=r"sample.ema_decay=0.99 is not one of"):
    config_lib.validate(config, 8)


def test_shortcut_with_several_emas_needs_an_explicit_target():
  config = config_lib.load_experiment("experiments/shortcut_toy2d.py", "tiny", **{
      "optim.ema_decays": (0.999, 0.99), "objective.target_ema": ""})
  setup = train.build(config, devices=jax.devices()[:1])
  with train.context(setup):
    state = setup.init_fn()
  with pytest.raises(ValueError, match="set objective.target_ema"):
    setup.objective.target_params(state.params, {"ema": state.ema})
  named = setup.objective.__class__(**{**vars(setup.objective), "target_ema": "0.99"})
  assert same_tree(named.target_params(state.params, {"ema": state.ema}), state.ema["0.99"])


def test_logged_lr_is_the_rate_applied_after_a_skipped_step(tmp_path, monkeypatch):
  monkeypatch.setattr(train.data, "build", _poisoned(train.data.build, 1))
  config = toy(**{"train.steps": 5, "train.nonfinite": "skip", "train.log_every": 1,
                  "optim.schedule": "linear", "optim.warmup_steps": 0, "optim.lr": 1e-2,
                  "optim.final_lr": 0.0})
  train.run(config, str(tmp_path))
  records = metrics.read_metrics(str(tmp_path))
  assert [r["nonfinite"] for r in records] == [0, 1, 0, 0, 0]
  schedule = optim.schedule(config.optim, config.train.steps)
  # Step k (1-based) applies optax's count = k - 1 - skipped-before-it.
  applied = [0, 1, 1, 2, 3]
  np.testing.assert_allclose([r["lr"] for r in records],
                             [float(schedule(c)) for c in applied], rtol=1e-6)
  assert schedule(1) != schedule(2)


def _poisoned(build, index):
  def poisoned(*args, **kwargs):
    inner = build(*args, **kwargs)
    return test_trainer.PoisonedBatches(inner, index) if kwargs.get("split") == "train" else inner
  return poisoned


def test_meanflow_cifar10_draws_times_near_the_data():
  """py-meanflow's CIFAR-10 run: logit-normal(-2, 2) with z_t = (1 - t) x + t e (t = 0 data)."""
  config = config_lib.load_experiment("experiments/meanflow_cifar10.py", "tiny")
  assert (config.objective.time_mean, config.objective.time_std) == (-2.0, 2.0)
  objective = objectives.OBJECTIVES.get("meanflow").build(config.objective, None, _Info())
  t, r = objective.sample_time_pairs(jax.random.key(0), 20_000)
  t, r = np.asarray(t), np.asarray(r)
  assert np.all(r <= t)
  # The larger of two logit-normal(-2, 2) draws has median sigmoid(-2 + 2 * 0.545) = 0.29 (the
  # old +2 put it at 0.95); a quarter of the pairs has r = t.
  assert np.median(t) < 0.4 and np.mean(t < 0.5) > 0.6
  assert np.median(r) < 0.2


class _Info:
  num_classes = 0
  image_shape = (8, 8, 3)


def _tracked_ema(decay, steps, every):
  """An EMA of a parameter held at 1.001, from 1.0, after `steps` float32 updates."""
  ema = {optim.ema_key(decay): {"w": np.float32(1.0)}}
  params = {"w": np.float32(1.001)}
  update = jax.jit(lambda e, s: optim.update_ema(e, params, s, (decay,), 0, every))
  for step in range(steps):
    ema = update(ema, step)
  return float(ema[optim.ema_key(decay)]["w"])


def test_ema_every_k_steps_keeps_small_float32_updates():
  decay, steps = 0.99995, 3200
  exact = 1.001 - 0.001 * decay ** steps
  # Every step: (1 - d) x 0.001 = 5e-8 is below half an ulp of 1.0, so the EMA never moves.
  assert _tracked_ema(decay, steps, every=1) == 1.0
  # Every 16 steps with d^16: the same average, within 3% of the exact increment.
  moved = _tracked_ema(decay, steps, every=16)
  assert abs((moved - 1.0) - (exact - 1.0)) < 0.03 * (exact - 1.0)


def test_ema_every_k_steps_equals_the_k_step_average():
  decay, every = 0.9, 4
  ema = {optim.ema_key(decay): {"w": np.float32(0.0)}}
  params = {"w": np.float32(1.0)}
  values = []
  for step in range(8):
    ema = optim.update_ema(ema, params, step, (decay,), 0, every)
    values.append(float(ema[optim.ema_key(decay)]["w"]))
  # Unchanged after steps 1-3, one d^4 update after step 4, again after step 8.
  np.testing.assert_allclose(values, [0, 0, 0, 1 - decay ** 4] * 1 + [1 - decay ** 4] * 3
                             + [1 - decay ** 8], rtol=1e-6)


def test_ema_every_is_validated():
  with pytest.raises(config_lib.ConfigError, match="optim.ema_every"):
    config_lib.validate(toy(**{"optim.ema_every": 0}), 1)


def test_radam_is_rectified_adam_with_l2_weight_decay():
  """optim.name='radam' (CTM's and iCT's optimizer) applies optax.radam to the gradient plus
  weight_decay x params, as torch.optim.RAdam does."""
  config = toy(**{"optim.name": "radam", "optim.lr": 1e-2, "optim.weight_decay": 0.1,
                  "optim.grad_clip": 0.0, "optim.schedule": "constant", "optim.warmup_steps": 0})
  tx, _ = optim.build(config.optim, 10)
  reference = optax.radam(1e-2, b1=config.optim.b1, b2=config.optim.b2, eps=config.optim.eps)
  params = {"w": jax.numpy.asarray([1.0, -2.0])}
  state, ref_state = tx.init(params), reference.init(params)
  for step in range(8):
    grads = {"w": jax.numpy.asarray([0.3, 0.1]) * (step + 1)}
    updates, state = tx.update(grads, state, params)
    expected, ref_state = reference.update(
        jax.tree.map(lambda g, p: g + 0.1 * p, grads, params), ref_state, params)
    np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)
    params = optax.apply_updates(params, updates)
  with pytest.raises(config_lib.ConfigError, match="radam"):
    config_lib.validate(toy(**{"optim.name": "rmsprop"}), 1)
