"""The EMA that samples and evaluations use is the configured one, the logged learning rate is
the applied one, and meanflow_cifar10 draws its times near the data as py-meanflow does."""

import jax
import numpy as np
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
