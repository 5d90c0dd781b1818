"""FID, Inception Score and bits/dim: closed forms and identities, the FID Inception-v3's
architecture (pinned to pytorch-fid's parameter count), weight conversion and loading through the
real file path with random weights the tests write, and clear errors for wrong files.

The full 299 x 299 network is only traced (jax.eval_shape); forward passes use the same network
with every width divided by 16 at its smallest input (75 x 75).
"""

import json
import logging
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from flowjax import config as config_lib, train
from flowjax.data import digits
from flowjax.evals import fid, nll

# pytorch-fid's FID Inception (torchvision's Inception-v3 without AuxLogits, fc of 1008 classes):
# torchvision's 27,161,264 parameters (1000 classes, with AuxLogits) minus AuxLogits (3,326,696)
# minus its 1000-way fc (2,049,000); the 1008-way fc adds 2048 * 1008 + 1008 = 2,065,392.
PARAMS_WITHOUT_FC = 21_785_568
PARAMS_WITH_FC = 23_850_960
NUM_CONVS = 94
DIVISOR = 16
SIZE = fid.MIN_INPUT_SIZE
BATCH = 16
# The torch state-dict names of each parameter kind, and the axis order of their layout.
TORCH_LEAVES = {("conv", "kernel"): ("conv.weight", (3, 2, 0, 1)),
                ("bn", "scale"): ("bn.weight", None), ("bn", "bias"): ("bn.bias", None),
                ("bn", "mean"): ("bn.running_mean", None), ("bn", "var"): ("bn.running_var", None),
                ("fc", "kernel"): ("fc.weight", (1, 0)), ("fc", "bias"): ("fc.bias", None)}


def random_params(divisor, seed=0):
  """Random weights of the network (flax layout) with He-scaled kernels and a non-trivial
  BatchNorm, so that activations stay of order one through the 94 layers."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in traverse_util.flatten_dict(fid.abstract_params(divisor)).items():
    shape = leaf.shape
    if path[-1] == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    elif path[-1] == "var":
      value = rng.uniform(0.5, 2.0, shape)
    elif path[-1] == "scale":
      value = rng.uniform(0.8, 1.2, shape)
    else:
      value = 0.1 * rng.standard_normal(shape)
    flat[path] = value.astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def torch_state_dict(params):
  """The same weights as a torch state dict would name and lay them out."""
  out = {}
  for path, value in traverse_util.flatten_dict(params).items():
    name, axes = TORCH_LEAVES[path[-2:]]
    out[".".join(path[:-2] + (name,))] = value if axes is None else np.transpose(value, axes)
    if path[-2:] == ("bn", "var"):
      out[".".join(path[:-2] + ("bn.num_batches_tracked",))] = np.int64(7)
  return out


def tiny_config(**overrides):
  overrides = {"train.batch_size": BATCH, **overrides}
  return config_lib.load_experiment("quickstart.py", "tiny", **overrides)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(params, runtime weight file, Inception at 75 x 75) for random width/16 weights converted
  from a torch-layout .npz by the real conversion."""
  directory = tmp_path_factory.mktemp("inception")
  params = random_params(DIVISOR)
  torch_file = str(directory / "state_dict.npz")
  np.savez(torch_file, **torch_state_dict(params))
  weights = str(directory / "inception.npz")
  fid.main(["--convert", torch_file, "--out", weights])
  return params, weights, fid.load(weights, image_size=SIZE, batch_size=BATCH)


def test_full_network_shapes_parameter_count_and_torch_names():
  model = fid.InceptionV3()
  images = jax.ShapeDtypeStruct((2, fid.INPUT_SIZE, fid.INPUT_SIZE, 3), jnp.float32)
  outputs, variables = jax.eval_shape(model.init_with_output, jax.random.key(0), images)
  assert {k: v.shape for k, v in outputs.items()} == {
      "pool": (2, 2048), "logits": (2, 1008), "logits_unbiased": (2, 1008)}
  flat = traverse_util.flatten_dict(variables["params"])
  assert len(flat) == 5 * NUM_CONVS + 2
  learned = {path: int(np.prod(leaf.shape)) for path, leaf in flat.items()
             if path[-1] not in ("mean", "var")}
  assert sum(learned.values()) == PARAMS_WITH_FC
  assert sum(n for path, n in learned.items() if path[0] != "fc") == PARAMS_WITHOUT_FC
  # pytorch-fid's names and torch layouts of a few arrays, from torchvision's Inception3.
  torch_shapes = {fid.torch_name(path): fid.to_torch_layout(path, np.empty(leaf.shape)).shape
                  for path, leaf in flat.items()}
  assert torch_shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
  assert torch_shapes["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
  assert torch_shapes["Mixed_6a.branch3x3.conv.weight"] == (384, 288, 3, 3)
  assert torch_shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
  assert torch_shapes["Mixed_6e.branch7x7dbl_2.conv.weight"] == (192, 192, 7, 1)
  assert torch_shapes["Mixed_7a.branch3x3_2.conv.weight"] == (320, 192, 3, 3)
  assert torch_shapes["Mixed_7b.branch3x3dbl_1.conv.weight"] == (448, 1280, 1, 1)
  assert torch_shapes["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
  assert torch_shapes["Mixed_7c.branch_pool.bn.running_var"] == (192,)
  assert torch_shapes["fc.weight"] == (1008, 2048)
  assert torch_shapes["fc.bias"] == (1008,)


def test_tf_pooling_ignores_the_padding():
  """The FID graph's 3x3 pools: the average of a constant map is that constant also at the
  borders (padding not counted), and padding never wins the max of a negative map."""
  x = jnp.full((1, 5, 6, 2), -3.0)
  np.testing.assert_allclose(fid.avg_pool_3x3(x), x, rtol=1e-6)
  np.testing.assert_allclose(fid.max_pool_3x3(x, 1), x)
  assert fid.max_pool_3x3(x, 2).shape == (1, 2, 2, 2)


def _random_covariance(rng, dim, rank):
  factor = rng.standard_normal((dim, rank))
  return factor @ factor.T / rank


def test_frechet_distance_identities_and_closed_forms():
  rng = np.random.default_rng(0)
  dim = 48
  mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
  sigma1, sigma2 = _random_covariance(rng, dim, 96), _random_covariance(rng, dim, 96)
  assert abs(fid.frechet_distance(mu1, sigma1, mu1, sigma1)) < 1e-8
  np.testing.assert_allclose(fid.frechet_distance(mu1, sigma1, mu2, sigma2),
                             fid.frechet_distance(mu2, sigma2, mu1, sigma1), rtol=1e-10)
  # Commuting (diagonal) covariances: ||mu1 - mu2||^2 + sum (sqrt(v1) - sqrt(v2))^2.
  var1, var2 = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
  expected = np.sum((mu1 - mu2)**2) + np.sum((np.sqrt(var1) - np.sqrt(var2))**2)
  np.testing.assert_allclose(fid.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)),
                             expected, rtol=1e-10)
  # Equal covariances: only the means differ.
  np.testing.assert_allclose(fid.frechet_distance(mu1, sigma1, mu2, sigma1),
                             np.sum((mu1 - mu2)**2), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("rank", [96, 10])
def test_frechet_distance_matches_the_eigenvalues_of_the_covariance_product(rank):
  """tr (S1 S2)^(1/2) is the sum of the square roots of the eigenvalues of S1 S2 (real and
  >= 0), also for singular covariances (rank 10 of 48: fewer samples than features)."""
  rng = np.random.default_rng(rank)
  dim = 48
  mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
  sigma1, sigma2 = _random_covariance(rng, dim, rank), _random_covariance(rng, dim, rank)
  eigenvalues = np.linalg.eigvals(sigma1 @ sigma2).real
  expected = (np.sum((mu1 - mu2)**2) + np.trace(sigma1) + np.trace(sigma2)
              - 2 * np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None))))
  np.testing.assert_allclose(fid.frechet_distance(mu1, sigma1, mu2, sigma2), expected,
                             rtol=1e-6)


def test_inception_score_of_uniform_and_of_confident_balanced_predictions():
  assert fid.inception_score(np.zeros((40, 1008)), num_splits=4) == pytest.approx((1.0, 0.0))
  num_classes = 10
  one_hot = np.full((100, 1008), -1e4)
  one_hot[np.arange(100), np.arange(100) % num_classes] = 0.0
  mean, std = fid.inception_score(one_hot, num_splits=10)
  assert mean == pytest.approx(num_classes, rel=1e-9) and std < 1e-9
  # Confident but all the same class: no diversity, score 1.
  same = np.full((20, 1008), -1e4)
  same[:, 3] = 0.0
  assert fid.inception_score(same, num_splits=2)[0] == pytest.approx(1.0)


def test_converted_weights_load_as_written(tiny, tmp_path):
  params, weights, _ = tiny
  loaded, divisor = fid.load_weights(weights)
  assert divisor == DIVISOR
  expected = traverse_util.flatten_dict(params)
  got = traverse_util.flatten_dict(loaded)
  assert set(got) == set(expected)
  for path, value in expected.items():
    np.testing.assert_array_equal(got[path], value, err_msg=str(path))
  safetensors = pytest.importorskip("safetensors.numpy")
  state_dict = {k: np.ascontiguousarray(v) for k, v in torch_state_dict(params).items()
                if np.ndim(v)}
  safetensors.save_file(state_dict, str(tmp_path / "sd.safetensors"))
  converted = fid.convert(str(tmp_path / "sd.safetensors"), str(tmp_path / "out.npz"))
  for path, value in expected.items():
    np.testing.assert_array_equal(converted["/".join(path)], value)


def test_wrong_weight_files_give_clear_errors(tiny, tmp_path):
  params, weights, _ = tiny
  stored = dict(np.load(weights))
  missing = dict(stored)
  del missing["Mixed_6c/branch7x7dbl_3/bn/var"]
  np.savez(tmp_path / "missing.npz", **missing)
  with pytest.raises(fid.AssetError, match=r"1 missing.*Mixed_6c/branch7x7dbl_3/bn/var"):
    fid.load_weights(str(tmp_path / "missing.npz"))
  wrong = dict(stored, **{"Mixed_6b/branch7x7_2/conv/kernel": np.zeros((7, 1, 8, 8))})
  np.savez(tmp_path / "wrong.npz", **wrong)
  with pytest.raises(fid.AssetError, match=r"Mixed_6b/branch7x7_2/conv/kernel: expected "
                     r"\(1, 7, 8, 8\), found \(7, 1, 8, 8\).*--convert"):
    fid.load_weights(str(tmp_path / "wrong.npz"))
  np.savez(tmp_path / "torch_names.npz", **torch_state_dict(params))
  with pytest.raises(fid.AssetError, match="torch state-dict names.*--convert"):
    fid.load_weights(str(tmp_path / "torch_names.npz"))
  with pytest.raises(fid.AssetError, match="torch file.*--convert"):
    fid.load_weights(str(tmp_path / fid.TORCH_WEIGHTS_FILE))
  with pytest.raises(fid.AssetError, match="does not exist.*--convert"):
    fid.load_weights(str(tmp_path / "absent.npz"))
  (tmp_path / "garbage.npz").write_bytes(b"not a zip")
  with pytest.raises(fid.AssetError, match="not a readable .npz"):
    fid.load_weights(str(tmp_path / "garbage.npz"))
  # Conversion: a torchvision-style dict with AuxLogits, and a transposed kernel.
  state_dict = torch_state_dict(params)
  with pytest.raises(fid.AssetError, match="AuxLogits.*ImageNet Inception"):
    fid.convert_state_dict(dict(state_dict, **{"AuxLogits.fc.bias": np.zeros(1000)}))
  name = "Mixed_7b.branch3x3_2a.conv.weight"
  bad = dict(state_dict, **{name: np.swapaxes(state_dict[name], 2, 3)})
  with pytest.raises(fid.AssetError, match=f"{name}: expected"):
    fid.convert_state_dict(bad)


def test_features_do_not_depend_on_batch_composition_or_order(tiny):
  """11 grayscale 8x8 images in sharded, zero-padded batches of 16 give each image the same
  features whatever its position; logits_unbiased = features @ fc kernel; pool features are
  >= 0 (after ReLU)."""
  params, _, inception = tiny
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (11, 8, 8, 1)).astype(np.float32)
  features, logits = inception.features_and_logits(images)
  assert features.shape == (11, 2048 // DIVISOR) and logits.shape == (11, 1008)
  assert np.isfinite(features).all() and (features >= 0).all() and features.std() > 0
  reversed_features, _ = inception.features_and_logits(images[::-1])
  np.testing.assert_allclose(reversed_features[::-1], features, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits, features @ params["fc"]["kernel"], rtol=1e-4, atol=1e-5)
  # FID of a set with itself, in another order, is 0 up to rounding; other images are not.
  stats = fid.feature_statistics(features)
  same = fid.frechet_distance(*stats, *fid.feature_statistics(reversed_features))
  blank = np.full((11, 8, 8, 1), -1.0, np.float32) + 0.1 * images
  other = fid.frechet_distance(*stats, *fid.feature_statistics(
      inception.features_and_logits(blank)[0]))
  assert abs(same) < 1e-7 and other > 1e3 * abs(same)


def test_preprocess_tiles_grayscale_and_resizes_bilinearly_like_pytorch_fid():
  """Grayscale is tiled to RGB; the resize is half-pixel bilinear without antialiasing
  (torch's interpolate(align_corners=False)): 2 -> 4 pixels gives a, (3a + b) / 4, (a + 3b) / 4,
  b, and 4 -> 2 averages neighbour pairs; values are clipped to [-1, 1]."""
  row = jnp.array([-0.5, 0.5]).reshape(1, 1, 2, 1) * jnp.ones((1, 2, 1, 1))
  up = fid.preprocess(row, size=4)
  assert up.shape == (1, 4, 4, 3)
  np.testing.assert_allclose(up[0, 1, :, 0], [-0.5, -0.25, 0.25, 0.5], atol=1e-6)
  np.testing.assert_allclose(up[..., 0], up[..., 2])
  down = fid.preprocess(jnp.array([0.0, 1.0, -1.0, 0.5]).reshape(1, 1, 4, 1) *
                        jnp.ones((1, 4, 1, 3)), size=2)
  np.testing.assert_allclose(down[0, 0, :, 1], [0.5, -0.25], atol=1e-6)
  np.testing.assert_allclose(fid.preprocess(jnp.full((1, 4, 4, 3), 3.0), size=4), 1.0)
  with pytest.raises(ValueError, match="Latents must be decoded"):
    fid.preprocess(jnp.zeros((1, 4, 4, 4)))


def test_reference_statistics_cover_the_first_examples_once_and_round_trip(tiny, tmp_path):
  """Statistics of the first 24 test digits (the running float64 moments equal np.cov of all
  features), with 10 of their feature vectors, distinct and drawn with the seed, kept for
  precision and recall; the file round-trips."""
  _, weights, inception = tiny
  num = 24  # two global batches of 16, the second cut short
  out = str(tmp_path / "reference.npz")
  fid.save_reference(out, fid.dataset_statistics(tiny_config(), inception, "test", num, 10))
  reference = fid.load_reference(out)
  images = digits.load()[0][digits.NUM_TRAIN:digits.NUM_TRAIN + num]
  features = inception.features_and_logits(images)[0]
  expected_mu, expected_sigma = fid.feature_statistics(features)
  np.testing.assert_allclose(reference.mu, expected_mu, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(reference.sigma, expected_sigma, rtol=1e-4, atol=1e-7)
  assert reference.num_examples == num and reference.feature_extractor == "inception"
  assert reference.digest == inception.digest == fid.params_digest(fid.load_weights(weights)[0])
  rows = [int(np.argmin(np.abs(features - kept).max(1))) for kept in reference.features]
  np.testing.assert_allclose(reference.features, features[rows], rtol=1e-5, atol=1e-6)
  assert len(set(rows)) == 10 and rows != sorted(rows)  # distinct, in random order
  again = fid.dataset_statistics(tiny_config(), inception, "test", num, 10)
  np.testing.assert_array_equal(again.features, reference.features)
  other_seed = fid.dataset_statistics(tiny_config(seed=1), inception, "test", num, 10)
  assert not np.array_equal(other_seed.features, reference.features)
  assert fid.dataset_statistics(tiny_config(), inception, "test", num, 0).features is None
  np.savez(tmp_path / "bad_stats.npz", mean=reference.mu)
  with pytest.raises(fid.AssetError, match="not 'mu' and 'sigma'.*--stats"):
    fid.load_reference(str(tmp_path / "bad_stats.npz"))
  np.savez(tmp_path / "bad_features.npz", mu=reference.mu, sigma=reference.sigma,
           pr_features=np.zeros((3, 5)))
  with pytest.raises(fid.AssetError, match=r"pr_features \(3, 5\); expected \[M, 128\]"):
    fid.load_reference(str(tmp_path / "bad_features.npz"))


def test_fid_evaluator_skips_with_a_warning_and_reports_when_configured(tiny, tmp_path, caplog):
  _, weights, inception = tiny
  reference = str(tmp_path / "reference.npz")
  real = digits.load()[0][:32]
  fid.save_reference(reference, fid.Reference(
      *fid.feature_statistics(inception.features_and_logits(real)[0]), num_examples=32))
  setup = train.build(tiny_config(**{"eval.inception_weights": weights,
                                     "eval.fid_reference": reference,
                                     "eval.fid_num_samples": 20}))
  with train.context(setup):
    state = setup.init_fn()
  model = train.evaluable(setup, state)
  values = fid.evaluate_run(model, image_size=SIZE)
  assert set(values) == {"eval_fid", "eval_inception_score", "eval_inception_score_std"}
  # The same numbers from the sampler's own chunks (the evaluation key's FID stream, one fold
  # per chunk of train.batch_size) through the Inception and fid.scores.
  rng = jax.random.fold_in(model.rng, fid._FID_SAMPLE_STREAM)
  chunks = -(-20 // setup.config.train.batch_size)
  images = np.concatenate([np.asarray(model.sample(jax.random.fold_in(rng, index)))
                           for index in range(chunks)])[:20]
  features, logits = inception.features_and_logits(images)
  expected = fid.scores(features, logits, *fid.feature_statistics(
      inception.features_and_logits(real)[0]))
  assert values["eval_fid"] == pytest.approx(expected["fid"], rel=1e-4)
  assert values["eval_inception_score"] == pytest.approx(expected["inception_score"], rel=1e-4)
  for overrides, message in [({}, "set eval.inception_weights"),
                             ({"eval.inception_weights": str(tmp_path / "absent.npz"),
                               "eval.fid_reference": reference}, "absent.npz does not exist"),
                             ({"eval.inception_weights": weights,
                               "eval.fid_reference": weights}, "not 'mu' and 'sigma'")]:
    caplog.clear()
    with caplog.at_level(logging.INFO if not overrides else logging.WARNING):
      model = train.evaluable(setup, state)._replace(config=tiny_config(**overrides))
      assert fid.evaluate_run(model, image_size=SIZE) == {}
    assert "FID skipped" in caplog.text and message in caplog.text


def test_scores_of_samples_against_reference_statistics():
  rng = np.random.default_rng(3)
  features = rng.standard_normal((64, 8))
  logits = rng.standard_normal((64, 20))
  values = fid.scores(features, logits, *fid.feature_statistics(features))
  assert abs(values["fid"]) < 1e-8 and 1.0 < values["inception_score"] < 20.0
  with pytest.raises(fid.AssetError, match="same weight file"):
    fid.scores(features, logits, np.zeros(4), np.eye(4))


class GaussianDensity:
  """A stand-in exact-likelihood objective: x + h u, u ~ U[0, 1)^D, is scored under
  N(params['mean'], SCALE^2 I); bits/dim of the h-wide bins = (-log p - D log h) / (D ln 2)."""
  SCALE = 0.5
  BIN = 2.0 / 16  # digits take 17 levels in [-1, 1]

  def nll(self, params, batch, rng):
    x = batch["image"].reshape(batch["image"].shape[0], -1)
    y = x + self.BIN * jax.random.uniform(rng, x.shape)
    log_density = -0.5 * ((y - params["mean"]) / self.SCALE)**2 - 0.5 * jnp.log(
        2 * jnp.pi * self.SCALE**2)
    return -(jnp.mean(log_density, 1) + jnp.log(self.BIN)) / jnp.log(2.0)


@pytest.mark.parametrize("mean", [0.0, -0.5])
def test_bits_per_dim_of_a_gaussian_density_on_dequantised_digits(mean):
  """E_u (x - m + h u)^2 = a^2 + a h + h^2 / 3 with a = x - m, averaged over the first 3 x 16
  test digits, the ones three in-order batches read."""
  config = tiny_config()
  value = nll.bits_per_dim(GaussianDensity(), {"mean": jnp.float32(mean)}, config, "test", 3)
  x = digits.load()[0][digits.NUM_TRAIN:digits.NUM_TRAIN + 3 * BATCH].astype(np.float64)
  a, h, s = x - mean, GaussianDensity.BIN, GaussianDensity.SCALE
  nats = 0.5 * np.log(2 * np.pi * s**2) + np.mean(a**2 + a * h + h**2 / 3) / (2 * s**2) - np.log(h)
  np.testing.assert_allclose(value, nats / np.log(2), rtol=2e-3)


def test_bits_per_dim_needs_an_exact_likelihood():
  with pytest.raises(nll.NoLikelihoodError, match="no exact likelihood"):
    nll.bits_per_dim(object(), {}, tiny_config(), "test", 1)


def test_eval_json_gains_the_extra_metrics(tmp_path, monkeypatch):
  """Every evaluation (periodic in training and --mode=eval) merges the quality metrics into
  eval/step_N.json beside the loss."""
  from flowjax import evals, metrics
  setup = train.build(tiny_config())
  with train.context(setup):
    state = setup.init_fn()
  monkeypatch.setattr(evals, "quality_metrics", lambda model: {"eval_fid": 2.5})
  workdir = str(tmp_path)
  writer = metrics.Writer(workdir, enabled=True)
  result = train.evaluate(setup, state, 7, workdir, writer)
  writer.close()
  assert result["eval_fid"] == 2.5 and np.isfinite(result["eval_loss"])
  with open(os.path.join(workdir, "eval", "step_7.json")) as f:
    assert json.load(f) == {"step": 7, **result}


def test_eval_reports_bits_per_dim_of_the_sampled_parameters_for_likelihood_models():
  """quality_metrics scores the EMA parameters (sample.use_ema) of an objective with nll; FID
  is skipped (no Inception assets configured)."""
  from flowjax import evals
  from flowjax.data import data_info
  config = tiny_config(**{"eval.num_batches": 2})
  setup = types.SimpleNamespace(config=config, objective=GaussianDensity(),
                                mesh=fid.default_mesh(), rules=(),
                                info=data_info(config.data, "test"),
                                state_shardings=types.SimpleNamespace(params=None),
                                eval_rng=jax.random.key(0))
  state = types.SimpleNamespace(params={"mean": jnp.float32(0.0)},
                                ema={"0.995": {"mean": jnp.float32(-0.5)}})
  result = evals.quality_metrics(train.evaluable(setup, state))
  expected = nll.bits_per_dim(GaussianDensity(), {"mean": jnp.float32(-0.5)}, config, "test", 2)
  assert result == {"eval_bits_per_dim": pytest.approx(expected, rel=1e-6)}


def test_per_pixel_categorical_baseline_matches_a_hand_count():
  levels = 3
  grid = lambda k: np.asarray(k, np.float32) / (levels - 1) * 2 - 1
  # Two pixels; train: pixel 0 always level 0, pixel 1 levels 0, 1, 2, 2.
  train_images = grid([[0, 0], [0, 1], [0, 2], [0, 2]])
  test_images = grid([[0, 2], [1, 1]])
  # Add-one counts: pixel 0 (5, 1, 1) / 7, pixel 1 (2, 2, 3) / 7.
  expected = -np.mean(np.log2([5 / 7, 3 / 7, 1 / 7, 2 / 7]))
  assert abs(nll.per_pixel_categorical_bits(train_images, test_images, levels) - expected) < 1e-12
  uniform = grid(np.random.default_rng(0).integers(0, levels, (20000, 4)))
  assert abs(nll.per_pixel_categorical_bits(uniform[:10000], uniform[10000:], levels)
             - np.log2(levels)) < 1e-3
