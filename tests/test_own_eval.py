"""Evaluation on the user's own data: FID reference statistics of folder: and arrays: sources
through the --stats command line, precision and recall next to FID, and the classifier feature
extractor that needs no downloaded weights (trained on labelled data, a seeded random network
without labels), with one clear warning for each configured file that is missing or does not fit.

The Inception is the width/16 network of tests/test_fid.py with random weights.
"""

import logging
import os
import re

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from flowjax import config as config_lib, data, sharding, train
from flowjax.data import digits
from flowjax.evals import classifier, fid
from test_fid import BATCH, DIVISOR, SIZE, random_params

QUICKSTART = "quickstart.py:tiny"


def tiny_config(**overrides):
  return config_lib.load_experiment("quickstart.py", "tiny",
                                    **{"train.batch_size": BATCH, **overrides})


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("inception") / "inception.npz")
  fid.save_weights(path, random_params(DIVISOR))
  return path


def grey_folder(root, num=20):
  """A flat folder of num 20x24 grey-scale PNGs of random pixels (no labels)."""
  os.makedirs(root)
  rng = np.random.default_rng(0)
  for index in range(num):
    Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(
        os.path.join(root, f"{index:02d}.png"))
  return f"folder:{root}"


def striped_arrays(path, num_train=48, num_test=24, size=12, num_classes=3):
  """An .npz of [N, size, size] uint8 images whose class c is a bright band in rows 4c .. 4c + 3
  over noise, with x_test/y_test; classes are easy to learn."""
  rng = np.random.default_rng(0)

  def split(num):
    labels = np.arange(num) % num_classes
    images = rng.integers(0, 80, (num, size, size)).astype(np.uint8)
    for index, label in enumerate(labels):
      images[index, 4 * label:4 * label + 4] = 230
    return images, labels

  (x_train, y_train), (x_test, y_test) = split(num_train), split(num_test)
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  return f"arrays:{path}"


def served_images(name, image_size, split="train"):
  """Every example of a split as the data source serves it, in order: [N, H, W, C]."""
  data_config = ml_collections.ConfigDict(dict(
      name=name, conditional=False, image_size=image_size, num_classes=0, random_flip=False,
      num_workers=0, prefetch=0))
  info = data.data_info(data_config, split)
  mesh = fid.default_mesh()
  batches = data.build(data_config, split=split, global_batch_size=8 * info.num_examples,
                       seed=0, sharding=sharding.batch_sharding(mesh), shuffle=False)
  images = np.asarray(next(batches)["image"])[:info.num_examples]
  batches.close()
  return images


# ----------------------------------------------------------------------------------------------
# --stats on folder: and arrays:


@pytest.mark.parametrize("kind", ["grey_folder", "arrays"])
def test_stats_command_line_on_own_data(tmp_path, inception_weights, kind, capsys):
  """`--stats --config.data.name=...` writes the statistics of every train image as the source
  serves it (a flat grey folder needs no --config.data.conditional=False) at the Inception's 299
  x 299, grey tiled to RGB, with 8 distinct feature vectors for precision and recall."""
  if kind == "grey_folder":
    name, image_size, num = grey_folder(str(tmp_path / "grey")), 16, 20
  else:
    name, image_size, num = striped_arrays(str(tmp_path / "stripes.npz")), 12, 48
  out = str(tmp_path / "stats.npz")
  fid.main(["--stats", f"--config={QUICKSTART}", f"--config.data.name={name}",
            f"--config.data.image_size={image_size}", f"--weights={inception_weights}",
            f"--out={out}", "--num_pr_features=8"])
  assert f"statistics of {num} examples of {name} split 'train'" in capsys.readouterr().out
  reference = fid.load_reference(out)
  images = served_images(name, image_size)
  assert images.shape == (num, image_size, image_size, 1)
  inception = fid.load(inception_weights, batch_size=BATCH)
  features = inception.features_and_logits(images)[0]
  np.testing.assert_allclose(features, inception.features_and_logits(np.tile(images, 3))[0],
                             rtol=1e-5, atol=1e-6)
  mu, sigma = fid.feature_statistics(features)
  np.testing.assert_allclose(reference.mu, mu, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(reference.sigma, sigma, rtol=1e-4, atol=1e-7)
  assert reference.num_examples == num and reference.features.shape == (8, features.shape[1])
  rows = [int(np.argmin(np.abs(features - kept).max(1))) for kept in reference.features]
  assert len(set(rows)) == 8
  np.testing.assert_allclose(reference.features, features[rows], rtol=1e-5, atol=1e-6)
  assert (reference.feature_extractor, reference.digest) == ("inception", inception.digest)


def test_stats_command_line_rejects_bad_overrides(tmp_path, inception_weights, capsys):
  for argument, message in [("--config.data.nam=x", r"'nam' Did you mean \"name\""),
                            ("--config.data.image_size=abc", "invalid literal for int"),
                            ("--config.eval.feature_extractor=vgg", "not one of"),
                            ("stray", "unrecognized arguments: stray")]:
    with pytest.raises(SystemExit):
      fid.main(["--stats", f"--config={QUICKSTART}", argument,
                f"--weights={inception_weights}", f"--out={tmp_path / 'x.npz'}"])
    assert message.replace("\\", "") in capsys.readouterr().err
  assert not (tmp_path / "x.npz").exists()


# ----------------------------------------------------------------------------------------------
# the classifier feature extractor


def test_classifier_trains_on_labelled_arrays_and_round_trips(tmp_path, capsys, monkeypatch):
  """On three classes of bands the trained network classifies the test split; the file loads as
  written, its features are the network's penultimate layer, and they separate the classes.
  Training keeps at most two steps in flight (sharding.DispatchWindow): XLA:CPU aborts a loop of
  8-device steps that runs 32 ahead."""
  unfinished = []

  class Recording(sharding.DispatchWindow):
    def add(self, value):
      super().add(value)
      unfinished.append(self.pending())

  monkeypatch.setattr(sharding, "DispatchWindow", Recording)
  name = striped_arrays(str(tmp_path / "stripes.npz"))
  out = str(tmp_path / "classifier.npz")
  classifier.main([f"--config={QUICKSTART}", f"--config.data.name={name}",
                   "--config.data.image_size=12", f"--out={out}", "--steps=60",
                   "--batch_size=16"])
  assert "accuracy" in capsys.readouterr().out
  assert len(unfinished) == 60 and max(unfinished) <= 2
  loaded = classifier.load(out, image_shape=(12, 12, 1), batch_size=BATCH)
  assert (loaded.num_classes, loaded.steps, loaded.accuracy_split) == (3, 60, "test")
  assert loaded.accuracy > 0.9
  images = served_images(name, 12, "test")
  features, logits = loaded.features_and_logits(images)
  model = classifier.FeatureCNN(num_classes=3, downsamples=classifier.num_downsamples((12, 12)))
  direct = model.apply({"params": jax.device_get(loaded.params)}, images)
  np.testing.assert_allclose(features, direct[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits, direct[1], rtol=1e-5, atol=1e-5)
  assert features.shape == (24, classifier.NUM_FEATURES)
  labels = np.arange(24) % 3
  means = np.stack([features[labels == c].mean(0) for c in range(3)])
  within = np.mean([np.linalg.norm(features[labels == c] - means[c], axis=1).mean()
                    for c in range(3)])
  between = np.min([np.linalg.norm(means[a] - means[b]) for a in range(3) for b in range(a)])
  assert between > within
  assert classifier.load(out).digest == loaded.digest == fid.params_digest(
      jax.device_get(loaded.params))


def test_classifier_without_labels_is_a_seeded_random_network(tmp_path, capsys):
  name = grey_folder(str(tmp_path / "grey"))
  runs = [("first.npz", 0), ("again.npz", 0), ("other.npz", 1)]
  for out, seed in runs:
    classifier.main([f"--config={QUICKSTART}", f"--config.data.name={name}",
                     f"--out={tmp_path / out}", f"--seed={seed}"])
  assert "has no labels" in capsys.readouterr().out
  first, again, other = (classifier.load(str(tmp_path / out)) for out, _ in runs)
  assert (first.num_classes, first.steps, first.image_shape) == (0, 0, (8, 8, 1))
  assert first.digest == again.digest != other.digest
  images = served_images(name, 8)
  features, logits = first.features_and_logits(images)
  assert logits is None and np.isfinite(features).all()
  assert np.linalg.norm(features - features.mean(0), axis=1).min() > 0  # images stay distinct


def test_classifier_file_errors_name_the_file_and_the_command(tmp_path):
  with pytest.raises(fid.AssetError, match=r"absent.npz does not exist; train it with `python -m "
                                           r"flowjax.evals.classifier .*--out=.*absent.npz`"):
    classifier.load(str(tmp_path / "absent.npz"))
  inception = str(tmp_path / "inception.npz")
  fid.save_weights(inception, random_params(DIVISOR))
  with pytest.raises(fid.AssetError, match="has no entry 'image_shape'"):
    classifier.load(inception)
  path = str(tmp_path / "c.npz")
  classifier.save(path, **classifier.train(tiny_config(), steps=0))
  with pytest.raises(fid.AssetError, match=r"made for images of shape \(8, 8, 1\), but the data "
                                           r"are \(28, 28, 1\)"):
    classifier.load(path, image_shape=(28, 28, 1))


# ----------------------------------------------------------------------------------------------
# evaluate_run: FID with precision and recall, and its warnings


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  """(directory, trained classifier file, reference file with 64 feature vectors in its
  features, a quickstart model with its evaluable): the classifier is trained 80 steps on the
  digits."""
  directory = tmp_path_factory.mktemp("digits_eval")
  weights = str(directory / "digits_classifier.npz")
  config = tiny_config()
  classifier.save(weights, **classifier.train(config, steps=80, batch_size=64))
  extractor = classifier.load(weights, batch_size=BATCH)
  reference = str(directory / "digits_reference.npz")
  fid.save_reference(reference, fid.dataset_statistics(config, extractor, "train", 64, 64))
  setup = train.build(config)
  with train.context(setup):
    state = setup.init_fn()
  return directory, weights, reference, train.evaluable(setup, state)


def with_config(model, **overrides):
  return model._replace(config=tiny_config(**overrides))


def test_classifier_features_tell_real_digits_from_noise(digits_run):
  _, weights, _, _ = digits_run
  extractor = classifier.load(weights, batch_size=BATCH)
  images = digits.load()[0]
  train_features = extractor.features_and_logits(images[:200])[0]
  test_features = extractor.features_and_logits(images[digits.NUM_TRAIN:][:200])[0]
  noise = np.random.default_rng(0).uniform(-1, 1, (200, 8, 8, 1)).astype(np.float32)
  noise_features = extractor.features_and_logits(noise)[0]
  stats = fid.feature_statistics(train_features)
  real_fd = fid.frechet_distance(*stats, *fid.feature_statistics(test_features))
  noise_fd = fid.frechet_distance(*stats, *fid.feature_statistics(noise_features))
  assert noise_fd > 10 * real_fd
  real = fid.precision_recall.precision_recall(train_features, test_features)
  fake = fid.precision_recall.precision_recall(train_features, noise_features)
  assert real["precision"] > 0.5 and real["recall"] > 0.5
  assert fake["precision"] < 0.1 and fake["recall"] < 0.1


def test_evaluation_in_classifier_features_reports_fid_precision_and_recall(digits_run, caplog):
  _, weights, reference, model = digits_run
  configured = {"eval.feature_extractor": "classifier", "eval.classifier_weights": weights,
                "eval.fid_reference": reference, "eval.fid_num_samples": 20}
  values = fid.evaluate_run(with_config(model, **configured))
  assert set(values) == {"eval_fid", "eval_precision", "eval_recall"}
  assert values["eval_fid"] > 0 and 0 <= values["eval_precision"] <= 1
  assert 0 <= values["eval_recall"] <= 1
  # The same 20 samples scored by hand: the first 20 of the 64 reference vectors.
  extractor = classifier.load(weights, batch_size=BATCH)
  stored = fid.load_reference(reference)
  rng = jax.random.fold_in(model.rng, fid._FID_SAMPLE_STREAM)
  samples = np.concatenate([np.asarray(model.sample(jax.random.fold_in(rng, i)))
                            for i in range(2)])[:20]
  features = extractor.features_and_logits(samples)[0]
  expected = fid.precision_recall.precision_recall(stored.features[:20], features)
  assert values["eval_precision"] == expected["precision"]
  assert values["eval_recall"] == expected["recall"]
  np.testing.assert_allclose(values["eval_fid"], fid.frechet_distance(
      *fid.feature_statistics(features), stored.mu, stored.sigma), rtol=1e-6)


def test_evaluation_with_the_inception_adds_precision_and_recall(digits_run, inception_weights):
  directory, _, _, model = digits_run
  inception = fid.load(inception_weights, image_size=SIZE, batch_size=BATCH)
  reference = str(directory / "inception_reference.npz")
  fid.save_reference(reference, fid.dataset_statistics(tiny_config(), inception, "train", 32, 32))
  values = fid.evaluate_run(with_config(
      model, **{"eval.inception_weights": inception_weights, "eval.fid_reference": reference,
                "eval.fid_num_samples": 20}), image_size=SIZE)
  assert set(values) == {"eval_fid", "eval_inception_score", "eval_inception_score_std",
                         "eval_precision", "eval_recall"}


def test_an_older_reference_file_skips_precision_and_recall_with_an_info_log(digits_run, caplog):
  directory, weights, reference, model = digits_run
  stored = fid.load_reference(reference)
  older = str(directory / "older.npz")
  np.savez(older, mu=stored.mu, sigma=stored.sigma, num_examples=64)
  with caplog.at_level(logging.INFO):
    values = fid.evaluate_run(with_config(
        model, **{"eval.feature_extractor": "classifier", "eval.classifier_weights": weights,
                  "eval.fid_reference": older, "eval.fid_num_samples": 20}))
  assert set(values) == {"eval_fid"}
  assert "Precision and recall skipped" in caplog.text and "older.npz" in caplog.text
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_missing_or_mismatched_files_give_one_warning_each(digits_run, inception_weights,
                                                           tmp_path, caplog):
  """Each configured file that is missing or made for another feature space: {} and one warning
  naming the file and the command that makes it; nothing configured: an info line only."""
  _, weights, reference, model = digits_run
  inception_reference = str(tmp_path / "inception_reference.npz")
  inception = fid.load(inception_weights, image_size=SIZE, batch_size=BATCH)
  fid.save_reference(inception_reference,
                     fid.dataset_statistics(tiny_config(), inception, "train", 16, 16))
  other_weights = str(tmp_path / "random_classifier.npz")
  classifier.save(other_weights, **classifier.train(tiny_config(), steps=0))
  classifier_config = {"eval.feature_extractor": "classifier", "eval.fid_num_samples": 20}
  cases = [
      ({**classifier_config, "eval.classifier_weights": str(tmp_path / "absent.npz"),
        "eval.fid_reference": reference},
       [r"absent.npz does not exist", r"python -m flowjax.evals.classifier --config=",
        r"--config.data.name=digits --config.data.image_size=8 --out=.*absent.npz"]),
      ({**classifier_config, "eval.classifier_weights": weights,
        "eval.fid_reference": str(tmp_path / "no_stats.npz")},
       [r"no_stats.npz does not exist", r"python -m flowjax.evals.fid --stats --config=",
        r"--config.eval.feature_extractor=classifier --config.eval.classifier_weights=.*"
        r"digits_classifier.npz --out=.*no_stats.npz"]),
      ({**classifier_config, "eval.classifier_weights": weights,
        "eval.fid_reference": inception_reference},
       [r"inception_reference.npz holds inception features", r"uses classifier features"]),
      ({**classifier_config, "eval.classifier_weights": other_weights,
        "eval.fid_reference": reference},
       [r"digits_reference.npz holds classifier features of weights [0-9a-f]{16}, but the "
        r"evaluation uses classifier features of weights [0-9a-f]{16}"]),
      ({"eval.inception_weights": inception_weights, "eval.fid_reference": reference},
       [r"holds classifier features .* uses inception features"]),
  ]
  for overrides, messages in cases:
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      assert fid.evaluate_run(with_config(model, **overrides), image_size=SIZE) == {}
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and
                "reduced-width Inception" not in r.getMessage()]  # the test network's own
    assert len(warnings) == 1 and warnings[0].startswith("FID skipped"), warnings
    for message in messages:
      assert re.search(message, warnings[0]), (message, warnings[0])
  caplog.clear()
  with caplog.at_level(logging.INFO):
    assert fid.evaluate_run(with_config(model, **{"eval.feature_extractor": "classifier"})) == {}
  assert "set eval.classifier_weights" in caplog.text and "flowjax.evals.classifier" in caplog.text
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_config_names_a_known_feature_extractor():
  config = tiny_config(**{"eval.feature_extractor": "vgg"})
  with pytest.raises(config_lib.ConfigError,
                     match="eval.feature_extractor: Unknown value 'vgg'. Known: inception, "
                           "classifier"):
    config_lib.validate(config, 8)
  config_lib.validate(tiny_config(**{"eval.feature_extractor": "classifier"}), 8)


def test_classifier_training_that_diverges_stops_with_one_clear_error(tmp_path, monkeypatch):
  """A non-finite training loss (here an infinite learning rate) is an error naming it, and no
  classifier file is written."""
  monkeypatch.setattr(classifier, "LEARNING_RATE", float("inf"))
  out = tmp_path / "classifier.npz"
  with pytest.raises(ValueError, match="training loss is nan after 3 steps.*nothing was written"):
    classifier.main([f"--config={QUICKSTART}", f"--out={out}", "--steps=3", "--batch_size=16"])
  assert not out.exists()
