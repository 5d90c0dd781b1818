"""REPA (Yu et al., arXiv:2410.06940; flowjax.objectives.repa): the term is the official
projection loss, weight 0 changes nothing, the encoder is frozen, the term trains only the blocks
up to repa.depth and the projector, every continuous objective trains with it, a sharded mesh
computes the one-device term, a latent cache written with an encoder's features trains REPA with
features='cached', and a config REPA cannot run gives one clear error.

8 fake CPU devices from conftest.
"""

import dataclasses
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from flax import linen as nn
from safetensors import numpy as safetensors_numpy

import helpers
from flowjax import config as config_lib, data, models, objectives, optim, sharding, train
from flowjax import step as step_lib
from flowjax.data import cache_latents, digits as digits_data, latents
from flowjax.evals import digits as digits_classifier
from flowjax.models import autoencoder, dinov2
from flowjax.objectives import common, repa

# REPA on the tiny digits DiT (one block): the digits classifier's 4 x 4 tokens of width 32 on
# the DiT's 4 x 4 grid of 2 x 2 patches.
REPA_ON = {"repa.weight": 0.5, "repa.encoder": "digits", "repa.depth": 1,
           "repa.projector_dim": 64}
REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference")


def tiny(experiment, **overrides):
  return config_lib.load_experiment(f"experiments/{experiment}.py", "tiny",
                                    **{**REPA_ON, **overrides})


def jittered(tree, seed=0, scale=0.05):
  """`tree` with N(0, scale^2) noise added to every float leaf (so that zero-initialised gates
  and output layers pass gradients on)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (np.asarray(x) + scale * rng.standard_normal(np.shape(x))).astype(
      np.asarray(x).dtype), tree)


def first_batch(config, size=8):
  """The first global batch of `size` examples of the config's data, on the host."""
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                            jax.devices()[:1])
  batches = data.build(config.data, split="train", global_batch_size=size, seed=0,
                       sharding=sharding.batch_sharding(mesh))
  batch = jax.device_get(next(batches))
  batches.close()
  return batch


def built(config, repa_config):
  """(objective, params, extra) of `config` on one host: params jittered, extra as a fresh
  start has it (the encoder read from disk by load_extra)."""
  info = data.data_info(config.data)
  objective = objectives.build(config.objective, models.build(config.model, info), info,
                               repa_config)
  example = {"image": jnp.zeros((1,) + tuple(info.image_shape), jnp.float32)}
  if info.num_classes:
    example["label"] = jnp.zeros((1,), jnp.int32)
  params, extra = objective.init(jax.random.key(0), example)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(
          jax.devices()[0])), nn.meta.unbox(extra))
  extra = objective.load_extra(abstract)
  return objective, jittered(nn.meta.unbox(params)), extra


def loss_and_grads(objective, params, extra, batch, ema_decays=()):
  """(loss, metrics, gradients) at step 0, every EMA of `ema_decays` at `params`."""
  ema = {optim.ema_key(decay): params for decay in ema_decays}
  view = {"ema": ema, "extra": extra, "step": jnp.zeros((), jnp.int32)}
  fn = jax.jit(jax.value_and_grad(lambda p: objective.loss(p, batch, jax.random.key(1), 0, view),
                                  has_aux=True))
  (loss, metrics), grads = fn(params)
  return jax.device_get((loss, metrics, grads))


# Weight 0 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("experiment", ["quickstart", "meanflow_digits"])
def test_weight_zero_is_bitwise_the_objective_without_repa(experiment):
  """repa.weight = 0 with every other key set builds the plain objective on the plain backbone:
  the same parameters, no extra state, and bitwise the same loss, metrics and gradients."""
  config = tiny(experiment, **{"repa.weight": 0.0})
  batch = first_batch(config)
  plain, params, extra = built(config, None)
  off, off_params, off_extra = built(config, config.repa)
  assert off.repa is None and off_extra == extra == {}
  assert jax.tree.structure(off_params) == jax.tree.structure(params)
  want = loss_and_grads(plain, params, extra, batch)
  got = loss_and_grads(off, params, off_extra, batch)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


def test_a_workdir_from_before_repa_resumes_with_repa_at_its_defaults():
  """A checkpoint identity without the repa keys (written before they existed) is no difference
  to a config that leaves them at their defaults, and is one when REPA is on."""
  config = config_lib.load_experiment("experiments/quickstart.py", "tiny")
  old = {k: v for k, v in config_lib.identity(config).items() if not k.startswith("repa.")}
  assert len(old) < len(config_lib.identity(config))
  assert config_lib.differences(old, config_lib.identity(config)) == []
  assert config_lib.differences(old, config_lib.identity(tiny("quickstart"))) == [
      "repa.depth: '<absent>' -> 1", "repa.encoder: '<absent>' -> 'digits'",
      "repa.projector_dim: '<absent>' -> 64", "repa.weight: '<absent>' -> 0.5"]


# The term ------------------------------------------------------------------------------------


def test_term_is_the_official_projection_loss():
  """loss_REPA = -1/B sum_b 1/N sum_n <z, y> / (max(|z|, 1e-12) max(|y|, 1e-12)) computed by hand
  in NumPy (a zero feature vector included), and Alignment.add adds weight x loss_REPA and
  reports the mean cosine as repa_cos."""
  rng = np.random.default_rng(0)
  tokens = rng.standard_normal((3, 2, 2, 5)).astype(np.float32)
  features = rng.standard_normal((3, 2, 2, 5)).astype(np.float32)
  features[1, 0, 1] = 0.0
  cosines = np.zeros((3, 4))
  for b in range(3):
    for n in range(4):
      z, y = tokens[b].reshape(4, 5)[n], features[b].reshape(4, 5)[n]
      cosines[b, n] = z @ y / (max(np.linalg.norm(z), 1e-12) * max(np.linalg.norm(y), 1e-12))
  want = float(np.mean([np.mean(row) for row in cosines]))
  term, cos = repa.alignment_loss(jnp.asarray(tokens), jnp.asarray(features))
  np.testing.assert_allclose([term, cos], [-want, want], rtol=1e-6)
  loss, metrics = repa.Alignment(0.5, None).add(jnp.float32(2.0), {"mse": 1.0},
                                                jnp.asarray(tokens), jnp.asarray(features))
  np.testing.assert_allclose(loss, 2.0 - 0.5 * want, rtol=1e-6)
  np.testing.assert_allclose(metrics["repa_cos"], want, rtol=1e-6)
  assert metrics["mse"] == 1.0


def test_encoder_features_are_resized_to_the_backbone_grid():
  """Features on the backbone's grid are used as they are; on another grid they are resized to
  it, and a feature field that is constant over the grid stays that constant."""
  features = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 4, 3)), jnp.float32)
  assert repa.match_grid(features, (4, 4)) is features
  constant = jnp.broadcast_to(features[:, :1, :1], features.shape)
  for grid in ((2, 2), (7, 7), (8, 4)):
    resized = repa.match_grid(constant, grid)
    assert resized.shape == (2, *grid, 3)
    np.testing.assert_allclose(resized, jnp.broadcast_to(features[:, :1, :1], resized.shape),
                               rtol=1e-6)


def test_cached_features_give_the_online_term():
  """repa.features='cached' reads batch['repa_features'] ([B, N, D]); the encoder's own tokens
  stored there give the online objective's loss and gradients."""
  config = tiny("quickstart")
  batch = first_batch(config)
  online, params, extra = built(config, config.repa)
  tokens = online.repa.encoder.tokens(extra[repa.EXTRA_KEY], jnp.asarray(batch["image"]))
  cached = dataclasses.replace(online, repa=repa.Alignment(online.repa.weight, None))
  stored = dict(batch, repa_features=np.asarray(tokens).reshape(8, 16, 32))
  want = loss_and_grads(online, params, extra, batch)
  got = loss_and_grads(cached, params, {}, stored)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_encoder_is_frozen():
  """The loss has no gradient with respect to the encoder's parameters (its features enter under
  stop-gradient), although it depends on them."""
  config = tiny("quickstart")
  batch = first_batch(config)
  objective, params, extra = built(config, config.repa)

  def loss_of(encoder):
    view = {"ema": {}, "extra": {repa.EXTRA_KEY: encoder}, "step": 0}
    return objective.loss(params, batch, jax.random.key(1), 0, view)[0]

  encoder = extra[repa.EXTRA_KEY]
  grads = jax.jit(jax.grad(loss_of))(encoder)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))
  assert float(loss_of(jittered(encoder, scale=0.5))) != float(loss_of(encoder))


# The aligned blocks --------------------------------------------------------------------------


def term_gradients(model_config, image_shape, depth):
  """(gradients of loss_REPA alone, tokens) of `model_config` with repa_depth=depth, parameters
  jittered, random features of width 8 on the backbone's grid."""
  info = data.pipeline.DataInfo(image_shape=image_shape, num_classes=0, num_examples=None)
  model = models.build(model_config, info).clone(repa_depth=depth, repa_dim=8,
                                                 repa_projector_dim=16)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, *image_shape)), jnp.float32)
  times = (jnp.full((2,), 0.3),)
  params = jittered(nn.meta.unbox(common.init_model(model, jax.random.key(0), x, 1, None)))
  tokens_of = lambda p: common.apply_model(model, p, x, times, None, capture=True)[1]
  tokens = jax.eval_shape(tokens_of, params)
  target = jnp.asarray(np.random.default_rng(2).standard_normal(tokens.shape), jnp.float32)
  term = lambda p: repa.alignment_loss(tokens_of(p), target)[0]
  return jax.device_get(jax.jit(jax.grad(term))(params)), tokens


def max_abs(tree):
  return max(float(np.abs(np.asarray(leaf)).max()) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("depth", [1, 2])
def test_dit_term_trains_the_blocks_up_to_depth_and_the_projector(depth):
  config = models.default_config("dit")
  config.update(dict(patch_size=2, hidden_size=16, depth=3, num_heads=2))
  grads, tokens = term_gradients(config, (8, 8, 1), depth)
  assert tokens.shape == (2, 4, 4, 8)
  for name in ["x_embed", "time_embed_0", "repa_projector"] + [f"block_{i}" for i in range(depth)]:
    assert max_abs(grads[name]) > 0, name
  for name in ["final"] + [f"block_{i}" for i in range(depth, 3)]:
    assert max_abs(grads[name]) == 0, name


@pytest.mark.parametrize("depth, grid", [(1, (8, 8)), (2, (4, 4))])
def test_unet_term_trains_the_encoder_up_to_depth_and_the_projector(depth, grid):
  """Encoder blocks of the two-level U-Net (one block per level): enc_8x8_block0 (1),
  enc_4x4_down (2), enc_4x4_block0 (3); the decoder never learns from the term."""
  config = models.default_config("unet")
  config.update(dict(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
                     dropout=0.0))
  grads, tokens = term_gradients(config, (8, 8, 3), depth)
  assert tokens.shape == (2, *grid, 8)
  encoder = ["enc_8x8_block0", "enc_4x4_down", "enc_4x4_block0"]
  for name in ["enc_8x8_conv", "map_0", "repa_projector"] + encoder[:depth]:
    assert max_abs(grads[name]) > 0, name
  later = encoder[depth:] + [name for name in grads if name.startswith("dec_")]
  for name in later:
    assert max_abs(grads[name]) == 0, name


@pytest.mark.parametrize("name", ["dit", "unet"])
def test_the_network_computes_the_same_function_with_repa(name):
  """Without capture (sampling, evaluation) a REPA backbone is the plain one: the same output
  from the plain parameters, which lack the projector (so it does not run)."""
  config = models.default_config(name)
  small = (dict(patch_size=2, hidden_size=16, depth=2, num_heads=2) if name == "dit" else
           dict(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=()))
  config.update(small)
  info = data.pipeline.DataInfo(image_shape=(8, 8, 3), num_classes=0, num_examples=None)
  plain = models.build(config, info)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 3)), jnp.float32)
  params = jittered(nn.meta.unbox(common.init_model(plain, jax.random.key(0), x, 1, None)))
  times = (jnp.full((2,), 0.3),)
  aligned = plain.clone(repa_depth=1, repa_dim=8, repa_projector_dim=16)
  np.testing.assert_array_equal(common.apply_model(aligned, params, x, times, None),
                                common.apply_model(plain, params, x, times, None))


# Training ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def teacher_workdir(root):
  """A 2-step flow-matching run of quickstart:tiny, the teacher of CTM and sCD."""
  workdir = os.path.join(root, "teacher")
  train.run(config_lib.load_experiment("experiments/quickstart.py", "tiny",
                                       **{"train.steps": 2, "sample.every_steps": 0}), workdir)
  return workdir


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  return teacher_workdir(str(tmp_path_factory.mktemp("repa_teacher")))


TRAINED = {
    "flow_matching": ("quickstart", {}),
    "meanflow": ("meanflow_digits", {}),
    "imf_main_branch": ("imf_digits", {"repa.depth": 2}),
    "shortcut": ("shortcut_digits", {}),
    "imm": ("imm_digits", {}),
    "imm_unet": ("imm_cifar10", {}),
    "consistency": ("consistency_digits", {}),
    "ctm": ("ctm_digits", {"objective.teacher_workdir": "TEACHER"}),
    "sct": ("scm_digits", {}),
    "scd": ("scm_digits", {"objective.mode": "scd", "objective.teacher_workdir": "TEACHER"}),
    "tvm": ("tvm_digits", {}),
}


# Through the trainer: a plain objective, a JVP one, the U-Net, and one that reads a teacher into
# the state beside the encoder (sCD; CTM does the same and runs outside CI: its loss with REPA is
# the test below and a REPA-trained teacher serving it is test_a_teacher_trained_with_repa_...).
# The U-Net's run is outside CI too: the trainer's REPA path is the DiT runs', and the U-Net's
# term is tested through its gradients (test_unet_term_trains_...) and on a sharded mesh
# (test_sharded_term_equals_one_device[imm_cifar10]).
@pytest.mark.parametrize("name", ["flow_matching", "meanflow",
                                  pytest.param("imm_unet", marks=pytest.mark.slow),
                                  pytest.param("ctm", marks=pytest.mark.slow), "scd"])
def test_objectives_train_with_repa(name, teacher, tmp_path):
  """Two train steps with REPA on through the trainer: every step logs a finite repa_cos in
  [-1, 1] beside the loss."""
  experiment, overrides = TRAINED[name]
  overrides = {k: teacher if v == "TEACHER" else v for k, v in overrides.items()}
  config = tiny(experiment, **{"train.steps": 2, "sample.every_steps": 0, **overrides})
  helpers.tiny_run_errors(config, tmp_path)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  cosines = [r["repa_cos"] for r in records]
  assert len(cosines) == 2 and all(np.isfinite(cosines)) and all(-1 <= c <= 1 for c in cosines)


@pytest.mark.parametrize("name", ["flow_matching", "meanflow", "imf_main_branch", "shortcut", "imm",
                                  "consistency", "ctm", "sct", "tvm"])
def test_the_term_trains_the_projector_through_the_forward_that_carries_gradients(name, teacher):
  """The aligned forward is one with gradients (not a stop-gradient target's): the projector,
  which only the REPA term reaches, gets a non-zero gradient in every objective."""
  experiment, overrides = TRAINED[name]
  overrides = {k: teacher if v == "TEACHER" else v for k, v in overrides.items()}
  config = tiny(experiment, **overrides)
  objective, params, extra = built(config, config.repa)
  _, metrics, grads = loss_and_grads(objective, params, extra, first_batch(config),
                                     config.optim.ema_decays)
  assert np.isfinite(metrics["repa_cos"])
  assert max_abs(grads["repa_projector"]) > 0


def test_the_encoder_in_the_state_stays_the_files(tmp_path):
  """After training (MeanFlow with repa.* set as command-line overrides set them) the state's
  encoder parameters, saved in its checkpoint, are the committed classifier's, and the backbone
  carries the projector."""
  config = tiny("meanflow_digits", **{"train.steps": 2, "sample.every_steps": 0})
  state = train.run(config, str(tmp_path))
  from flowjax.evals import digits
  want = digits.load_classifier().params
  assert jax.tree.structure(state.extra[repa.EXTRA_KEY]) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(state.extra[repa.EXTRA_KEY]), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  assert "repa_projector" in state.params


@pytest.fixture(scope="module")
def repa_teacher(tmp_path_factory):
  """(workdir, final state) of a 2-step flow-matching run of quickstart:tiny with REPA."""
  workdir = str(tmp_path_factory.mktemp("repa_teacher"))
  return workdir, train.run(tiny("quickstart", **{"train.steps": 2, "sample.every_steps": 0}),
                            workdir)


@pytest.mark.parametrize("experiment, overrides", [
    ("ctm_digits", {}), ("scm_digits", {"objective.mode": "scd"}),
    ("scm_digits", {"objective.init_from_teacher": True, "model.time_scale": 1000.0})])
def test_a_teacher_trained_with_repa_serves_distillation(repa_teacher, experiment, overrides):
  """CTM, sCD and sCM's init_from_teacher read a teacher trained with REPA as any other: its
  weights without the projector, which they leave unread."""
  workdir, state = repa_teacher
  config = config_lib.load_experiment(f"experiments/{experiment}.py", "tiny",
                                      **{"objective.teacher_workdir": workdir, **overrides})
  setup = train.build(config, devices=jax.devices()[:1])
  with train.context(setup):
    fresh = setup.init_fn()
    extra = setup.objective.load_extra(setup.abstract_state.extra)
    params = getattr(setup.objective, "initial_params", lambda p, e: p)(fresh.params, extra)
  teacher = extra["teacher"] if "teacher" in extra else {
      k: v for k, v in params.items() if k != "scm_weighting"}
  want = state.ema[optim.ema_key(0.995)]
  assert "repa_projector" in want and "repa_projector" not in teacher
  want = {k: v for k, v in want.items() if k != "repa_projector"}
  assert jax.tree.structure(teacher) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(teacher), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


# Sharded --------------------------------------------------------------------------------------


def gradient_on(config, devices, state):
  setup = train.build(config, devices=devices)
  batch = first_batch(config, config.train.batch_size)
  gradient = jax.jit(step_lib.make_gradient(setup.objective, config.train, setup.step_rng,
                                            setup.state_shardings),
                     in_shardings=(setup.state_shardings,
                                   {k: v.sharding for k, v in setup.batch_spec.items()}))
  with train.context(setup):
    placed = jax.device_put(state, setup.state_shardings)
    return jax.device_get(gradient(placed, jax.device_put(batch, sharding.batch_sharding(
        setup.mesh))))


# imm_cifar10's r(s, t) steps back only (eta_max - eta_min) / 2^15 from t (the paper's CIFAR-10
# setting), so its loss is a difference of nearly equal maps, -6e-4 here: float32 reduction order
# moves its gradients by up to 2e-5 of their largest entry (1e-6 with a step of 2^-12). A sharded
# reduction that dropped or doubled a shard would move them by O(1).
@pytest.mark.parametrize("experiment, rtol", [("quickstart", 1e-5), ("imm_cifar10", 1e-4)])
def test_sharded_term_equals_one_device(experiment, rtol):
  """On a 2 x 2 mesh of fake devices (fsdp = 2, tensor = 2; the projector's kernels split over
  both) the loss, repa_cos and every gradient equal the one-device ones."""
  one = tiny(experiment, **{"train.batch_size": 8, "mesh.data": 1})
  setup = train.build(one, devices=jax.devices()[:1])
  with train.context(setup):
    state = jax.device_get(setup.init_fn())
    state = state.replace(extra=jax.device_get(setup.objective.load_extra(
        setup.abstract_state.extra)))
  state = state.replace(params=jittered(state.params))
  want_loss, want_metrics, want_grads = gradient_on(one, jax.devices()[:1], state)
  with one.unlocked():
    one.mesh.update(dict(data=1, fsdp=2, tensor=2))
  sharded = train.build(one, devices=jax.devices()[:4])
  specs = {str(s.spec) for s in jax.tree.leaves(sharded.state_shardings.params["repa_projector"])}
  assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs)
  loss, metrics, grads = gradient_on(one, jax.devices()[:4], state)
  np.testing.assert_allclose(loss, want_loss, rtol=rtol)
  np.testing.assert_allclose(metrics["repa_cos"], want_metrics["repa_cos"], rtol=1e-5,
                             atol=1e-6)
  # A leaf whose gradient is analytically zero (an attention key bias) holds rounding noise; it
  # is compared at 1e-3 of the largest gradient, as in tests/test_mesh_equivalence.py.
  floor = 1e-3 * max(np.abs(want).max() for want in jax.tree.leaves(want_grads))
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    assert np.abs(got - want).max() <= rtol * max(np.abs(want).max(), floor)


# DINOv2 ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dinov2_folder(tmp_path_factory):
  """The tiny DINOv2 fixture of tests/test_dinov2.py as a HuggingFace checkpoint folder (patch
  4, width 16)."""
  folder = tmp_path_factory.mktemp("dinov2")
  shutil.copy(os.path.join(REFERENCE, "dinov2_tiny.safetensors"), folder / "model.safetensors")
  shutil.copy(os.path.join(REFERENCE, "dinov2_tiny.json"), folder / "config.json")
  return str(folder)


@pytest.mark.parametrize("resolution, grid", [(16, (4, 4)), (32, (8, 8))])
def test_dinov2_target_is_its_patch_tokens_on_the_backbone_grid(dinov2_folder, resolution, grid):
  """repa.encoder='dinov2' aligns to dinov2.patch_tokens of the encoder at
  repa.encoder_resolution (on its (resolution / 4)^2 grid, which the term resizes to the DiT's
  4 x 4), and its loss and gradients are finite."""
  config = tiny("quickstart", **{"repa.encoder": "dinov2", "repa.encoder_path": dinov2_folder,
                                 "repa.encoder_resolution": resolution})
  config_lib.validate(config, 8)
  batch = first_batch(config)
  objective, params, extra = built(config, config.repa)
  loaded, module, weights = dinov2.load(dinov2_folder)
  _, module, weights = dinov2.for_resolution(loaded, weights, resolution)
  tokens = np.asarray(dinov2.patch_tokens(module, weights, jnp.asarray(batch["image"]),
                                          resolution))
  view = {"ema": {}, "extra": extra, "step": 0}
  np.testing.assert_allclose(objective.repa.target(batch, view), tokens.reshape(8, *grid, 16),
                             rtol=1e-5, atol=1e-6)
  loss, metrics, grads = loss_and_grads(objective, params, extra, batch)
  assert np.isfinite(loss) and np.isfinite(metrics["repa_cos"])
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


# Cached features: latent caches written with an encoder --------------------------------------


@pytest.fixture(scope="module")
def autoencoder_weights(tmp_path_factory):
  """(autoencoder_digits:tiny config, its weights file: random, in the diffusers layout)."""
  config = config_lib.load_experiment("experiments/autoencoder_digits.py", "tiny")
  model = autoencoder.build(config.model, data.DataInfo((8, 8, 1), 0, None))
  weights = str(tmp_path_factory.mktemp("repa_vae") / "vae.safetensors")
  safetensors_numpy.save_file(
      autoencoder.to_diffusers(helpers.random_autoencoder_params(model, (8, 8, 1))), weights)
  return config, weights


@pytest.fixture(scope="module")
def latent_cache(autoencoder_weights, tmp_path_factory):
  """The directory of the digits train split (1500 images) cached as latents with the digits
  encoder's features of each image (shards of 512)."""
  config, weights = autoencoder_weights
  out = str(tmp_path_factory.mktemp("repa_latents") / "cache")
  cache_latents.cache(config, out, weights=weights, batch_size=64, shard_size=512,
                      repa_encoder="digits")
  return out


def stored(out, split="train"):
  """(latents [n, 4, 4, 4], labels [n], features [n, N, D] float16, record sizes) of a cache, in
  source order."""
  spec, _ = latents.read_split(out, split)
  latent_shape, feature_shape = tuple(spec["latent_shape"]), tuple(spec["repa"]["feature_shape"])
  records = []
  for shard in range(spec["num_shards"]):
    reader = ArrayRecordReader(latents.shard_path(out, split, shard, spec["num_shards"]))
    records += reader.read_all()
    reader.close()
  pairs = [latents.decode_record(r, latent_shape) for r in records]
  features = np.stack([latents.decode_features(r, latent_shape, feature_shape) for r in records])
  return (np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs]), features,
          {len(r) for r in records})


def online_tokens(images):
  """The digits encoder's tokens [n, 16, 32] float32 of images [n, 8, 8, 1], as
  features='online' computes them in the train step."""
  found = repa.encoder("digits")
  tokens = jax.jit(found.tokens)(found.host_params, jnp.asarray(images))
  return np.asarray(tokens).reshape(len(images), 16, 32)


def assert_float16_of(got, want):
  """got (float16) is want rounded to float16: within one float16 ulp (2^-10 relative) of it, and
  1e-5 for the float32 rounding of the encoder's sums, computed here at another batch size."""
  assert got.dtype == np.float16
  np.testing.assert_allclose(got.astype(np.float32), want, rtol=2.0 ** -10, atol=1e-5)


def test_a_latent_cache_holds_the_encoder_features_of_its_images(latent_cache):
  """Each record holds, after the latent and the label, the digits encoder's tokens of the same
  image as float16 (REPA's target in online mode, to float16 rounding); cache.json describes
  them."""
  raw, labels, features, sizes = stored(latent_cache)
  images, digit_labels = digits_data.load(8)
  start, stop = digits_data.SPLITS["train"]
  assert raw.shape == (1500, 4, 4, 4) and features.shape == (1500, 16, 32)
  np.testing.assert_array_equal(labels, digit_labels[start:stop])
  assert_float16_of(features, online_tokens(images[start:stop]))
  assert sizes == {4 * (64 + 1) + 2 * 16 * 32}
  spec, _ = latents.read_split(latent_cache, "train")
  assert spec["repa"] == {"encoder": "digits", "encoder_path": digits_classifier.DEFAULT_PATH,
                          "encoder_resolution": None, "grid": [4, 4], "feature_shape": [16, 32],
                          "dtype": "float16"}


def test_the_latent_source_serves_each_latent_with_its_features(latent_cache):
  """On 8 devices, shuffled, batch['repa_features'] [B, 16, 32] float16 is sharded like the batch,
  each row is the features of the image whose latent is in that row of batch['image'] (the
  online encoder's tokens of that image), and two processes' rows make up the batch."""
  raw, _, _, _ = stored(latent_cache)
  images, _ = digits_data.load(8)
  start, stop = digits_data.SPLITS["train"]
  tokens = online_tokens(images[start:stop])
  data_config = config_lib.base_config().data
  data_config.update(dict(name=f"latents:{latent_cache}", conditional=True, prefetch=0,
                          latent_scaling="none"))
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  build = lambda **kwargs: data.build(data_config, split="train", global_batch_size=16, seed=3,
                                      sharding=batch_sharding, **kwargs)
  batches = build()
  assert batches.element_spec[latents.REPA_KEY].shape == (16, 16, 32)
  assert batches.element_spec[latents.REPA_KEY].dtype == np.float16
  halves = [build(process_index=p, process_count=2) for p in range(2)]
  for k in range(2):
    batch = next(batches)
    features = batch[latents.REPA_KEY]
    assert features.shape == (16, 16, 32) and features.dtype == jnp.float16
    assert features.sharding == batch_sharding
    pieces = np.concatenate([h._local_batch(k)[latents.REPA_KEY] for h in halves])
    np.testing.assert_array_equal(pieces, features)
    indices = [int(np.argmin(np.abs(raw - latent).reshape(len(raw), -1).max(1)))
               for latent in np.asarray(batch["image"])]
    np.testing.assert_array_equal(raw[indices], batch["image"])
    assert_float16_of(np.asarray(features), tokens[indices])
  batches.close()


def cached_config(out, **overrides):
  """quickstart:tiny with REPA on the digits encoder's cached features of the latents at `out`
  (the DiT's 4 x 4 grid of 1 x 1 patches, the features' grid)."""
  return tiny("quickstart", **{"data.name": f"latents:{out}", "repa.features": "cached",
                               "model.patch_size": 1, **overrides})


def test_training_on_cached_latents_aligns_to_the_cached_features(latent_cache, tmp_path):
  """A short run with repa.features='cached' on the cache: the step's batches carry the
  features, the state holds no encoder, the projector maps to their width 32, the logged loss is
  the objective's on each batch and every step logs a finite repa_cos."""
  config = cached_config(latent_cache, **{"train.steps": 2, "sample.every_steps": 0})
  setup = train.build(config, devices=jax.devices()[:1])
  assert setup.objective.repa.encoder is None and setup.abstract_state.extra == {}
  assert setup.batch_spec[repa.BATCH_KEY].shape == (16, 16, 32)
  assert setup.batch_spec[repa.BATCH_KEY].dtype == np.float16
  widths = {leaf.shape[-1] for leaf in jax.tree.leaves(
      setup.abstract_state.params["repa_projector"])}
  assert 32 in widths
  helpers.tiny_run_errors(config, tmp_path)
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  cosines = [r["repa_cos"] for r in records]
  assert len(cosines) == 2 and all(np.isfinite(cosines)) and all(-1 <= c <= 1 for c in cosines)


def test_a_cache_of_dinov2_features_holds_its_patch_tokens(autoencoder_weights, dinov2_folder,
                                                           tmp_path):
  """--repa_encoder=dinov2 stores dinov2.patch_tokens of each image at the given resolution (16:
  a 4 x 4 grid of width 16), records that resolution, and a config asking for another one is
  told to write a cache at it."""
  config, weights = autoencoder_weights
  cache_latents.cache(config, str(tmp_path), weights=weights, split="test", batch_size=64,
                      shard_size=320, repa_encoder="dinov2", repa_encoder_path=dinov2_folder,
                      repa_encoder_resolution=16)
  _, _, features, _ = stored(str(tmp_path), "test")
  images, _ = digits_data.load(8)
  start, stop = digits_data.SPLITS["test"]
  loaded, module, weights_of = dinov2.load(dinov2_folder)
  _, module, weights_of = dinov2.for_resolution(loaded, weights_of, 16)
  tokens = np.asarray(dinov2.patch_tokens(module, weights_of, jnp.asarray(images[start:stop]),
                                          16))
  assert features.shape == (297, 16, 16)
  assert_float16_of(features, tokens)
  spec, _ = latents.read_split(str(tmp_path), "test")
  assert spec["repa"]["encoder_resolution"] == 16
  assert spec["repa"]["encoder_path"] == os.path.abspath(dinov2_folder)
  run = cached_config(str(tmp_path), **{"repa.encoder": "dinov2", "eval.every_steps": 1,
                                        "eval.split": "test"})
  for resolution, error in ((16, None), (32, "repa.encoder_resolution=16, not 32")):
    with run.unlocked():
      run.repa.encoder_resolution = resolution
    if error is None:
      config_lib.validate(run, 8)
      continue
    with pytest.raises(config_lib.ConfigError) as raised:
      config_lib.validate(run, 8)
    assert error in str(raised.value)
    assert "--repa_encoder=dinov2 --repa_encoder_path=<DINOv2 checkpoint> " \
           "--repa_encoder_resolution=32" in str(raised.value)


def fake_cache(source, root, entry, split="train"):
  """A cache at `root` whose `split` has the metadata of `source`'s train split with 'repa'
  set to `entry` (shards absent: the config check reads cache.json and stats.json only)."""
  os.makedirs(os.path.join(root, split))
  spec, stats = latents.read_split(source, "train")
  with open(os.path.join(root, split, latents.SPEC_FILE), "w") as f:
    json.dump(dict(spec, split=split, repa=entry), f)
  with open(os.path.join(root, split, latents.STATS_FILE), "w") as f:
    json.dump(stats, f)


@pytest.mark.parametrize("case, overrides, message", [
    ("no features", {}, "(split 'train') holds none; write a cache with them: python -m "
                        "flowjax.data.cache_latents --config=<autoencoder experiment> "
                        "--weights=<weights> --split=train --out=<new directory> "
                        "--repa_encoder=digits; or set --config.repa.weight=0."),
    ("eval split without features", {"eval.every_steps": 1, "eval.split": "test"},
     "(split 'test') holds none; write a cache with them: python -m flowjax.data.cache_latents"),
    ("other encoder", {"repa.encoder": "dinov2", "repa.encoder_path": "/weights/dinov2-base"},
     "holds the features of another encoder (repa.encoder='digits', not 'dinov2'). Set "
     "config.repa to the cache's encoder (encoder_path '' takes the cache's), or write a cache "
     "with this one: python -m flowjax.data.cache_latents --config=<autoencoder experiment> "
     "--weights=<weights> --split=train --out=<new directory> --repa_encoder=dinov2 "
     "--repa_encoder_path=/weights/dinov2-base"),
    ("other weights", {"repa.encoder_path": "/elsewhere/digits_classifier.msgpack"},
     "(repa.encoder_path=" + repr(digits_classifier.DEFAULT_PATH) + ", not "
     "'/elsewhere/digits_classifier.msgpack')"),
])
def test_cached_features_of_another_encoder_or_none_are_one_clear_error(
    latent_cache, tmp_path, case, overrides, message):
  """repa.features='cached' on a latent cache without features (in the train split or in the
  evaluated one) or with another encoder's: one error naming the cache_latents command that
  writes the right ones."""
  spec, _ = latents.read_split(latent_cache, "train")
  root = str(tmp_path / "cache")
  if case == "no features":
    fake_cache(latent_cache, root, None)
  else:
    fake_cache(latent_cache, root, spec["repa"])
    fake_cache(latent_cache, root, None if case.startswith("eval") else spec["repa"], "test")
  config = cached_config(root, **overrides)
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config, 8)
  assert message in str(error.value)
  if case == "no features":
    # What the data would serve is also checked where the backbone is built.
    info = data.data_info(config.data)
    assert info.extra_arrays == ()
    with pytest.raises(ValueError, match=r"which these data do not provide; write a latent "
                       r"cache with REPA features: python -m flowjax.data.cache_latents"):
      repa.setup(config.repa, "flow_matching", models.build(config.model, info), info)


def test_the_matching_cache_validates_and_encoder_path_empty_takes_the_caches(latent_cache):
  for path in ("", digits_classifier.DEFAULT_PATH):
    config_lib.validate(cached_config(latent_cache, **{"repa.encoder_path": path}), 8)


def test_cache_latents_refuses_an_encoder_it_cannot_load(autoencoder_weights, latent_cache,
                                                         tmp_path):
  """An unknown encoder, DINOv2 without weights, and a rerun into a cache written with other
  features are each one error naming the flag."""
  config, weights = autoencoder_weights
  run = functools.partial(cache_latents.cache, config, str(tmp_path / "new"), weights=weights,
                          batch_size=64, shard_size=512)
  with pytest.raises(ValueError, match="--repa_encoder: Unknown REPA encoder 'dino'"):
    run(repa_encoder="dino")
  with pytest.raises(ValueError, match=r"--repa_encoder='dinov2' needs "
                                       r"--repa_encoder_path=<DINOv2 checkpoint>"):
    run(repa_encoder="dinov2")
  with pytest.raises(ValueError, match=r"\(repa differ"):
    cache_latents.cache(config, latent_cache, weights=weights, batch_size=64, shard_size=512)


# Bad configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("experiment, overrides, message", [
    ("quickstart", {"repa.encoder": ""}, "config.repa.encoder is empty; set "
                                         "--config.repa.encoder=digits"),
    ("quickstart", {"repa.encoder": "dinov3"}, "Unknown REPA encoder 'dinov3'. Did you mean "
                                               "'dinov2'?"),
    ("quickstart", {"repa.weight": -0.5}, "config.repa.weight=-0.5 must be a number >= 0"),
    ("quickstart", {"repa.features": "offline"}, "config.repa.features: Unknown value"),
    ("quickstart", {"repa.depth": 0}, "config.repa.depth=0 must be a positive integer"),
    ("quickstart", {"repa.features": "cached"}, "which data.name='digits' does not provide "
                                                "(only latent caches written by python -m "
                                                "flowjax.data.cache_latents --repa_encoder=... "
                                                "hold REPA features); use "
                                                "--config.repa.features=online."),
    ("quickstart", {"data.name": "latents:/no/cache"}, "config.repa.features='online' encodes "
                                                       "batch['image'], but "
                                                       "data.name='latents:/no/cache' holds "
                                                       "autoencoder latents"),
    ("fm_toy2d", {}, "model.name='mlp' has no hidden tokens REPA could align; use a backbone "
                     "among dit, imf_dit, unet"),
    ("starflow_digits", {}, "objective 'starflow' has no denoiser forward whose hidden tokens "
                            "REPA could align; REPA works with the objectives consistency, ctm, "
                            "flow_matching, imm, meanflow, scm, shortcut, tvm"),
    ("autoencoder_digits", {}, "objective 'autoencoder' has no denoiser forward"),
])
def test_a_config_repa_cannot_run_is_one_clear_error(experiment, overrides, message):
  config = tiny(experiment, **overrides)
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config, 8)
  assert message in str(error.value)


def test_a_depth_beyond_the_backbone_is_one_clear_error():
  config = tiny("quickstart", **{"repa.depth": 2})
  with pytest.raises(config_lib.ConfigError, match=r"config.repa.depth=2: .* use 1 to 1"):
    train.build(config, devices=jax.devices()[:1])


def test_configs_without_a_repa_section_build_without_repa():
  """A config written before config.repa existed (its config.json read back) validates and
  builds the plain objective."""
  config = config_lib.load_experiment("experiments/quickstart.py", "tiny")
  tree = json.loads(config_lib.to_json(config))
  del tree["repa"]
  old = config_lib.from_json(json.dumps(tree))
  config_lib.validate(old, 8)
  assert train.build(old, devices=jax.devices()[:1]).objective.repa is None
  assert not repa.enabled(ml_collections.ConfigDict(dict(weight=0.0)))


@pytest.mark.parametrize("experiment", ["quickstart", "shortcut_digits", "meanflow_digits"])
def test_the_logged_error_leaves_the_alignment_term_out(experiment):
  """The progress line's `error` is the objective's own error, not loss + weight x (-cos): for
  flow matching and Shortcut (no ERROR_METRIC) the loss without REPA's term, which stays
  positive while the total goes below zero."""
  config = tiny(experiment)
  objective, params, extra = built(config, config.repa)
  loss, metrics, _ = loss_and_grads(objective, params, extra, first_batch(config),
                                    config.optim.ema_decays)
  error = float(step_lib.error_of(objective, loss, metrics))
  plain = float(metrics[repa.UNALIGNED_LOSS])
  assert float(loss) == pytest.approx(plain + 0.5 * (-metrics["repa_cos"]), rel=1e-5, abs=1e-6)
  if hasattr(objective, "ERROR_METRIC"):
    assert error == float(metrics[objective.ERROR_METRIC])
  else:
    assert error == plain > 0
