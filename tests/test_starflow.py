"""TarFlow / STARFlow properties (Zhai et al., arXiv:2412.06329; Gu et al., arXiv:2506.06276): exact
inversion by every decoder, the log-determinant against autodiff, autoregressive structure, identity
at initialisation, the guidance rules, Tweedie denoising, bits/dim, and skipped non-finite
updates."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flowjax import step as step_lib
from flowjax.models import tarflow
from flowjax.objectives import starflow
from flowjax.samplers import autoregressive
from flowjax.state import TrainState

SHAPE = (4, 4, 2)  # patch 1: 16 tokens of 2 channels
NUM_CLASSES = 3


def make_model(start_token=True, **overrides):
  settings = dict(image_shape=SHAPE, patch_size=1, hidden_size=16, num_blocks=2,
                  layers_per_block=1, deep_layers=0, num_heads=2, num_classes=NUM_CLASSES,
                  start_token=start_token, scale="softplus" if start_token else "exp",
                  soft_clip=4.0 if start_token else 0.0,
                  condition="deep" if start_token else "all")
  settings.update(overrides)
  return tarflow.TarFlow(**settings)


def init_params(model, x, cond):
  init = jax.jit(lambda x, cond: nn.meta.unbox(model.init(jax.random.key(0), x, cond)["params"]))
  return init(x, cond)


def init_objective(objective, batch):
  init = jax.jit(lambda batch: nn.meta.unbox(objective.init(jax.random.key(0), batch)[0]))
  return init(batch)


def perturb(params, seed=1, scale=0.1):
  """Every parameter (the zero-initialised output projections included) plus N(0, scale^2)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([leaf + scale * jax.random.normal(key, leaf.shape, leaf.dtype)
                            for leaf, key in zip(leaves, keys)])


VARIANTS = {
    "start_token": dict(start_token=True),
    "shift": dict(start_token=False),
    # apple/ml-starflow's architecture: RoPE, the label as a prefix token, L2R, final RMSNorm.
    "starflow_official": dict(tarflow.STARFLOW_OPTIONS, order="l2r", hidden_size=48),
    # apple/ml-tarflow's: class-mean null label, no final norm, channel-first patches.
    "tarflow_official": dict(tarflow.TARFLOW_OPTIONS, patch_size=2, image_shape=(8, 8, 2)),
    # ml-starflow's text-to-image model: 3 text tokens of 5 features as the deep block's prefix
    # (here through one trainable caption-encoder layer, model.text_layers).
    "starflow_text": dict(tarflow.STARFLOW_OPTIONS, order="l2r", hidden_size=48, num_classes=0,
                          text_dim=5, text_length=3, text_layers=1, text_heads=1),
}


def null_of(model):
  """The null condition: the null label, or a text model's null caption (zero features)."""
  if model.text_dim:
    return jnp.zeros((model.text_length, model.text_dim), jnp.float32)
  return NUM_CLASSES


def null_rows(model, cond):
  """[B] bool: the rows of `cond` that hold the null condition."""
  if model.text_dim:
    return np.all(np.asarray(cond) == 0, axis=(1, 2))
  return np.asarray(cond) == NUM_CLASSES


@pytest.fixture(scope="module", params=list(VARIANTS))
def flow(request):
  """(model, random non-trivial params, x [3, 4, 4, 2], labels [3] with one null, jitted
  forward) for STARFlow (start token), TarFlow (one-token shift) and the official STARFlow
  architecture."""
  model = make_model(**VARIANTS[request.param])
  x = jax.random.normal(jax.random.key(2), (3,) + tuple(model.image_shape))
  cond = jnp.array([0, 2, NUM_CLASSES], jnp.int32)
  if model.text_dim:  # two captions and the null one
    features = jax.random.normal(jax.random.key(3), (2, model.text_length, model.text_dim))
    cond = jnp.concatenate([features, null_of(model)[None]])
  params = perturb(init_params(model, x, cond))
  forward = jax.jit(lambda p, x, c: model.apply({"params": p}, x, c))
  return model, params, x, cond, forward


def test_identity_at_initialisation(flow):
  model, _, x, cond, forward = flow
  params = init_params(model, x, cond)
  z, logdet, intermediates = forward(params, x, cond)
  np.testing.assert_allclose(z, x, atol=1e-6)
  np.testing.assert_allclose(logdet, 0.0, atol=1e-6)
  assert len(intermediates) == model.num_blocks - 1


def test_every_decoder_inverts_the_forward_map(flow):
  """reverse(forward(x)) = x to 1e-5 by token-by-token KV-cached decoding, by full recomputation
  (naive) and by Jacobi iteration; the cached and naive decoders agree token for token."""
  model, params, x, cond, forward = flow
  z, _, _ = forward(params, x, cond)
  assert float(jnp.max(jnp.abs(z - x))) > 0.1  # the random weights make a non-trivial flow
  run = jax.jit(lambda p, z, c, method, tolerance, chunk=4: autoregressive.invert(
      model, p, z, c, method=method, chunk_size=chunk, tolerance=tolerance, max_iterations=32),
      static_argnums=(3, 5))
  cached, steps = run(params, z, cond, "kv_cache", 0.0)
  naive, _ = run(params, z, cond, "naive", 0.0)
  np.testing.assert_allclose(cached, x, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(naive, cached, rtol=1e-5, atol=1e-5)
  assert int(steps) == model.num_blocks * 16
  # Jacobi to the exact fixed point (a zero change stops it) equals sequential decoding; the
  # default tolerance needs fewer iterations than tokens.
  jacobi, iterations = run(params, z, cond, "jacobi", 1e-30)
  np.testing.assert_allclose(jacobi, cached, rtol=1e-5, atol=1e-5)
  assert int(iterations) <= model.num_blocks * (16 + 4)
  # Chunks of 5 over 16 tokens: three full ones and a last one of 1.
  ragged, _ = run(params, z, cond, "jacobi", 1e-30, 5)
  np.testing.assert_allclose(ragged, cached, rtol=1e-5, atol=1e-5)
  approximate, fewer = run(params, z, cond, "jacobi", 1e-3)
  np.testing.assert_allclose(approximate, x, atol=5e-2)
  # Fewer iterations with the tolerance for the STARFlow models; the unclipped exp scale of the
  # TarFlow ones may need every iteration.
  assert int(fewer) < int(iterations) if model.start_token else int(fewer) <= int(iterations)


@pytest.fixture(scope="module")
def jacobians(flow):
  """Per-block Jacobians [L, C, L, C] (data order) at x[0] and at block 0's output, from one
  compiled jax.jacfwd."""
  model, params, x, cond, _ = flow

  def block(index, t):
    return model.apply({"params": params}, index, t[None], cond[:1], method="block_forward")[0][0]

  @jax.jit
  def both(tokens):
    middle = block(0, tokens)
    return jax.jacfwd(lambda t: block(0, t))(tokens), jax.jacfwd(lambda t: block(1, t))(middle)

  return both(model.to_tokens(x[:1])[0])


def test_logdet_is_log_abs_det_of_the_jacobian_per_dimension(flow, jacobians):
  """log|det dz/dx| / D of the whole flow (the product of the block Jacobians) is its logdet."""
  model, params, x, cond, forward = flow
  size = x[0].size
  first, second = (np.asarray(j, np.float64).reshape(size, size) for j in jacobians)
  _, log_abs_det = np.linalg.slogdet(second @ first)
  logdet = forward(params, x[:1], cond[:1])[1][0]
  np.testing.assert_allclose(log_abs_det / size, logdet, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block_index", [0, 1])
def test_each_block_is_autoregressive_in_its_token_order(flow, jacobians, block_index):
  """dz_i/dx_j = 0 for every token j after token i in the block's order, dz_i/dx_i is diagonal
  over channels, and dz_i/dx_j != 0 for some earlier j."""
  model = flow[0]
  jacobian = np.asarray(jacobians[block_index])
  length, channels = jacobian.shape[:2]
  order = np.asarray(model.permute(block_index, jnp.arange(length)[None, :, None])[0, :, 0])
  jacobian = jacobian[order][:, :, order]  # block order
  for i in range(length):
    later = jacobian[i, :, i + 1:]
    assert np.all(later == 0.0), (i, np.abs(later).max())
    own = jacobian[i, :, i]
    assert np.all(own[~np.eye(channels, dtype=bool)] == 0.0)
  assert np.abs(jacobian[length - 1, :, :length - 1]).max() > 1e-3
  first = jacobian[0, :, 0]
  if model.start_token:  # token 0 is transformed too
    assert np.abs(first - np.eye(channels)).max() > 1e-3
  else:  # token 0 passes unchanged
    np.testing.assert_array_equal(first, np.eye(channels))


def test_guidance_rules_and_zero_weight():
  rng = np.random.default_rng(0)
  mu_c, mu_u = rng.normal(size=(2, 5))
  sigma_c = rng.uniform(0.2, 1.0, 5)
  sigma_u = sigma_c * rng.uniform(1.1, 3.0, 5)  # q < 1
  for rule in autoregressive.RULES.values():
    mu, sigma = rule(mu_c, sigma_c, mu_u, sigma_u, 0.0)
    np.testing.assert_allclose(mu, mu_c, rtol=1e-6)
    np.testing.assert_allclose(sigma, sigma_c, rtol=1e-6)
  # STARFlow: p_c^(1+w) / p_u^w, normalised on a grid, is the stated Gaussian.
  w = 1.5
  mu, sigma = autoregressive.starflow_guidance(mu_c, sigma_c, mu_u, sigma_u, w)
  for i in range(5):
    grid = np.linspace(mu_c[i] - 12 * sigma_c[i], mu_c[i] + 12 * sigma_c[i], 200001)
    log_c = -0.5 * ((grid - mu_c[i]) / sigma_c[i]) ** 2 - np.log(sigma_c[i])
    log_u = -0.5 * ((grid - mu_u[i]) / sigma_u[i]) ** 2 - np.log(sigma_u[i])
    log_p = (1 + w) * log_c - w * log_u
    p = np.exp(log_p - log_p.max())
    p /= p.sum()
    mean = np.sum(p * grid)
    np.testing.assert_allclose(mu[i], mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sigma[i], np.sqrt(np.sum(p * (grid - mean) ** 2)), rtol=1e-4)
  # TarFlow: linear in mu and log sigma.
  mu, sigma = autoregressive.tarflow_guidance(mu_c, sigma_c, mu_u, sigma_u, w)
  np.testing.assert_allclose(mu, mu_c + w * (mu_c - mu_u), rtol=1e-6)
  np.testing.assert_allclose(np.log(sigma), np.log(sigma_c) + w * np.log(sigma_c / sigma_u),
                             rtol=1e-5, atol=1e-6)
  # TarFlow on the shift only.
  mu, sigma = autoregressive.tarflow_shift_guidance(mu_c, sigma_c, mu_u, sigma_u, w)
  np.testing.assert_allclose(mu, mu_c + w * (mu_c - mu_u), rtol=1e-6)
  np.testing.assert_array_equal(sigma, sigma_c)
  # Annealing rises linearly to w at the last token.
  weights = autoregressive.guidance_weights(jnp.arange(4), 4, True, 2.0, True)
  np.testing.assert_allclose(weights, [0.5, 1.0, 1.5, 2.0])


def test_guided_sampling_with_zero_weight_is_the_conditional_model(flow):
  """The two-half (conditional + null cache) decoder with w = 0 equals plain conditional
  decoding; w > 0 changes the label-reading blocks only."""
  model, params, x, cond, forward = flow
  z, _, _ = forward(params, x, cond)
  run = jax.jit(lambda p, z, c, w: autoregressive.invert(
      model, p, z, c, guidance=w, null_label=null_of(model), anneal=True))
  plain, _ = jax.jit(lambda p, z, c: autoregressive.invert(model, p, z, c))(params, z, cond)
  zero, _ = run(params, z, cond, 0.0)
  np.testing.assert_allclose(zero, plain, atol=1e-5)
  strong, _ = run(params, z, cond, 2.0)
  assert float(jnp.max(jnp.abs(strong[:2] - plain[:2]))) > 1e-3


GUIDANCE = 1.5
# Every rule with annealed weights (a per-token weight that a misplaced index moves), and the
# constant weight once.
GUIDED = [(rule, True) for rule in autoregressive.RULES] + [("starflow", False)]


def numpy_guidance(rule, mu_c, sigma_c, mu_u, sigma_u, w):
  """The per-token guidance rules in float64: STARFlow's normalised p_c^(1 + w) / p_u^w (the
  precision ratio q clipped at 1), TarFlow's extrapolation of mu and log sigma, and of mu only."""
  shift = mu_c + w * (mu_c - mu_u)
  if rule == "starflow":
    q = np.minimum(sigma_c / sigma_u, 1.0) ** 2
    precision = 1.0 + w - w * q
    return ((1.0 + w) * mu_c - w * q * mu_u) / precision, sigma_c / np.sqrt(precision)
  if rule == "tarflow":
    return shift, sigma_c * (sigma_c / sigma_u) ** w
  if rule == "tarflow_shift":
    return shift, sigma_c
  raise NotImplementedError(rule)


@pytest.fixture(scope="module")
def guided_decodings(flow):
  """(z = forward(x), decode, sequence): decode(rule, anneal) -> {method: samples} decodes z with
  guidance w = GUIDANCE by every decoder (exact Jacobi), once per rule and anneal; sequence(block,
  tokens, labels) -> (mu, sigma) in float64 is the block's causal pass without a cache. The
  guided decoders are compiled per architecture; the one-token shift is that of
  tarflow_official, so the plain shift variant is left to the unguided tests."""
  if flow[0] == make_model(**VARIANTS["shift"]):
    pytest.skip("guided decoding of the one-token shift runs on tarflow_official")
  model, params, x, cond, forward = flow
  z, _, _ = forward(params, x, cond)
  run = jax.jit(lambda p, z, c, method, rule, anneal: autoregressive.invert(
      model, p, z, c, method=method, guidance=GUIDANCE, rule=rule, anneal=anneal,
      null_label=null_of(model), chunk_size=4, tolerance=1e-30, max_iterations=32)[0],
      static_argnums=(3, 4, 5))

  @functools.cache
  def decode(rule, anneal):
    return {method: np.asarray(run(params, z, cond, method, rule, anneal))
            for method in autoregressive.METHODS}

  block_sequence = jax.jit(lambda p, index, tokens, labels: model.apply(
      {"params": p}, index, tokens, labels, method="block_sequence"), static_argnums=1)

  def sequence(index, tokens, labels):
    mu, sigma = block_sequence(params, index, jnp.asarray(tokens, jnp.float32), labels)
    return np.asarray(mu, np.float64), np.asarray(sigma, np.float64)

  return z, decode, sequence


@pytest.mark.parametrize("rule, anneal", GUIDED)
def test_guided_decoders_agree(flow, guided_decodings, rule, anneal):
  """With guidance (w = 1.5, every rule, constant or annealed weights) the KV-cached, naive and
  exact-Jacobi decoders give the same samples to float32 rounding."""
  decoded = guided_decodings[1](rule, anneal)
  assert set(decoded) == {"kv_cache", "naive", "jacobi"}
  cached = decoded["kv_cache"]
  scale = float(np.abs(cached).max())
  for method in ("naive", "jacobi"):
    np.testing.assert_allclose(decoded[method], cached, rtol=0, atol=1e-4 * scale,
                               err_msg=method)


@pytest.mark.parametrize("rule, anneal", GUIDED)
def test_guided_decoding_applies_the_rule_per_token(flow, guided_decodings, rule, anneal):
  """Teacher forcing: every block's conditional and null-label causal passes over the decoded
  tokens give each token's (mu_c, sigma_c, mu_u, sigma_u), which the rule combines with the
  token's weight (w, or annealed w (t + 1 - t0) / (L - t0) at position t of the block's order,
  t0 = 0 with a start token, 1 without); the guided maps (x - mu) / sigma of the blocks in turn
  take every decoder's samples back to their noise, token by token. Blocks that do not read the
  label have equal passes, which any rule leaves unchanged. With w = 0 instead (the conditional
  model) the labelled rows miss their noise."""
  model, _, _, cond, _ = flow
  z, decode, sequence = guided_decodings
  length, _ = model.token_shape
  positions = np.arange(length)
  if anneal:
    first = 0 if model.start_token else 1
    weights = GUIDANCE * np.clip((positions + 1 - first) / (length - first), 0.0, 1.0)
  else:
    weights = np.full(length, GUIDANCE)
  null = jnp.broadcast_to(null_of(model), cond.shape)

  def guided_forward(samples, weights):
    tokens = np.asarray(model.to_tokens(jnp.asarray(samples)), np.float64)
    for index in range(model.num_blocks):
      tokens = np.asarray(model.permute(index, tokens))  # block order
      mu, sigma = numpy_guidance(rule, *sequence(index, tokens, cond),
                                 *sequence(index, tokens, null), weights[None, :, None])
      tokens = np.asarray(model.permute(index, (tokens - mu) / sigma))
    return tokens

  noise = np.asarray(model.to_tokens(z), np.float64)
  scale = float(np.abs(noise).max())
  for method, samples in decode(rule, anneal).items():
    np.testing.assert_allclose(guided_forward(samples, weights), noise, rtol=0,
                               atol=2e-5 * scale, err_msg=method)
  conditional = guided_forward(decode(rule, anneal)["kv_cache"], 0.0 * weights)
  missed = float(np.abs(conditional - noise)[~null_rows(model, cond)].max())
  assert missed > 1e-2, missed


@pytest.mark.parametrize("rule, anneal", GUIDED)
def test_guided_null_label_rows_are_the_unconditional_model(flow, guided_decodings, rule,
                                                              anneal):
  """A row labelled with the null label has equal conditional and null-label halves, so every
  rule with any weight decodes it as the unguided null-label model (which inverts the forward
  map exactly): its guided sample is the x that z = forward(x, null) came from, by every
  decoder, while the labelled rows of the same batch move."""
  model, _, x, cond, _ = flow
  x = np.asarray(x)
  nulls = null_rows(model, cond)
  assert 0 < nulls.sum() < len(nulls)
  scale = float(np.abs(x).max())
  for method, samples in guided_decodings[1](rule, anneal).items():
    np.testing.assert_allclose(samples[nulls], x[nulls], rtol=0, atol=1e-5 * scale,
                               err_msg=method)
    moved = float(np.abs(samples[~nulls] - x[~nulls]).max())
    assert moved > 1e-2, (method, moved)

def test_tweedie_step_on_gaussian_data_is_the_posterior_mean():
  """Data N(0, s^2), noise sigma_n: the exact flow of the noisy data is z = y / sqrt(s^2 +
  sigma_n^2) (one block, constant scale through the output bias) and Tweedie's step gives
  y s^2 / (s^2 + sigma_n^2)."""
  s, noise_std, dims = 0.8, 0.3, 3
  model = tarflow.TarFlow(image_shape=(dims,), hidden_size=16, num_blocks=1, layers_per_block=1,
                          num_heads=2, start_token=True, scale="softplus", soft_clip=4.0)
  objective = starflow.StarFlow(model=model, image_shape=(dims,), num_classes=0,
                                noise="gaussian", noise_std=noise_std)
  y = jax.random.normal(jax.random.key(3), (5, dims)) * math.sqrt(s ** 2 + noise_std ** 2)
  params = init_objective(objective, {"image": y})
  sigma = math.sqrt(s ** 2 + noise_std ** 2)
  a = math.log(math.expm1(sigma)) - tarflow.INV_SOFTPLUS_ONE  # softplus(a + 0.5413) = sigma
  bias = jnp.array([4.0 * math.atanh(a / 4.0), 0.0])  # inverts the soft clip 4 tanh(. / 4)
  params["blocks_0"]["proj_out"]["bias"] = bias
  log_p = jax.jit(objective.log_density)(params, y, None)
  exact = -0.5 * jnp.sum(y ** 2, 1) / sigma ** 2 - dims * (math.log(sigma) + 0.5 * math.log(
      2 * math.pi))
  np.testing.assert_allclose(log_p, exact, rtol=1e-5)
  denoised = jax.jit(lambda p, v: autoregressive.tweedie_denoise(
      lambda u: objective.log_density(p, u, None), v, noise_std))(params, y)
  np.testing.assert_allclose(denoised, y * s ** 2 / (s ** 2 + noise_std ** 2), rtol=1e-5,
                             atol=1e-6)


def test_bits_per_dim_of_the_identity_flow_by_hand():
  """At initialisation z = y, so -log p(y) / D = 0.5 mean(y^2) + 0.5 log(2 pi) and bits/dim =
  (that + log(K / 2)) / ln 2 for y = (k + u) / K * 2 - 1 on digits' K = 17 levels."""
  levels, shape = 17, (4, 4, 1)
  model = tarflow.TarFlow(image_shape=shape, hidden_size=16, num_blocks=2, layers_per_block=1,
                          num_heads=2)
  objective = starflow.StarFlow(model=model, image_shape=shape, num_classes=0,
                                noise="dequantize", data_levels=levels)
  k = np.random.default_rng(0).integers(0, levels, (6,) + shape)
  x = jnp.asarray(k / (levels - 1) * 2.0 - 1.0, jnp.float32)  # like flowjax.data.digits
  params = init_objective(objective, {"image": x})
  rng = jax.random.key(7)
  u = np.asarray(jax.random.uniform(rng, x.shape))
  y = (k + u) / levels * 2.0 - 1.0
  assert np.all((y >= k / levels * 2 - 1) & (y < (k + 1) / levels * 2 - 1))  # y in bin k
  nll = 0.5 * np.mean(y ** 2) + 0.5 * math.log(2 * math.pi)
  expected = (nll + math.log(levels / 2)) / math.log(2)
  bits, loss, metrics = jax.jit(lambda p, batch, rng: (objective.nll(p, batch, rng),) +
                                objective.loss(p, batch, rng, 0, {}))(params, {"image": x}, rng)
  np.testing.assert_allclose(bits, expected, rtol=1e-5)
  # The loss draws its own dequantisation from the same law; at the identity it is 0.5 mean z^2.
  np.testing.assert_allclose(metrics["bits_per_dim"],
                             (metrics["nll"] + math.log(levels / 2)) / math.log(2), rtol=1e-6)
  np.testing.assert_allclose(metrics["intermediate"], 2.0 * metrics["prior"], rtol=1e-5)
  np.testing.assert_allclose(loss, metrics["nll"] - 0.5 * math.log(2 * math.pi)
                             + 1e-4 * metrics["intermediate"], rtol=1e-5)
  assert abs(float(metrics["nll"]) - nll) < 0.05


def test_a_nan_loss_update_is_skipped_and_counted():
  shape = (4,)
  model = tarflow.TarFlow(image_shape=shape, hidden_size=16, num_blocks=1, layers_per_block=1,
                          num_heads=2)
  objective = starflow.StarFlow(model=model, image_shape=shape, num_classes=0,
                                noise="gaussian", noise_std=0.05)
  good = {"image": jax.random.uniform(jax.random.key(1), (4,) + shape, minval=-1, maxval=1)}
  params = init_objective(objective, good)
  tx = optax.adam(1e-2)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     ema={}, extra={}, skipped=jnp.zeros((), jnp.int32))

  class Settings:
    grad_accum_steps = 1
    ema_decays = ()
    ema_start_step = 0

  train_step = jax.jit(step_lib.make_train_step(objective, tx, optax.constant_schedule(1e-2),
                                                Settings, Settings, jax.random.key(0)))
  bad = {"image": good["image"].at[0, 0].set(jnp.nan)}
  after_bad, metrics = train_step(state, bad)
  assert not np.isfinite(float(metrics["loss"]))
  assert int(metrics["nonfinite"]) == 1 and int(after_bad.skipped) == 1
  assert int(after_bad.step) == 1
  jax.tree.map(np.testing.assert_array_equal, after_bad.params, state.params)
  after_good, metrics = train_step(after_bad, good)
  assert int(metrics["nonfinite"]) == 0 and int(after_good.skipped) == 1
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), after_good.params,
                                         state.params))
  assert any(changed)


def test_errors_name_the_key_and_the_fix():
  with pytest.raises(ValueError, match="data_levels"):
    starflow.StarFlow(model=make_model(), image_shape=SHAPE, num_classes=0, data_levels=1)
  with pytest.raises(ValueError, match="noise"):
    starflow.StarFlow(model=make_model(), image_shape=SHAPE, num_classes=0, noise="uniform")
  objective = starflow.StarFlow(model=make_model(), image_shape=SHAPE, num_classes=NUM_CLASSES)
  with pytest.raises(ValueError, match="guidance"):
    objective.sample({}, jax.random.key(0), 2, jnp.zeros((2,), jnp.int32), guidance=0.5)
  with pytest.raises(ValueError, match="kv_cache"):
    autoregressive.invert(make_model(), {}, jnp.zeros((1,) + SHAPE), method="euler")
  with pytest.raises(ValueError, match="patch_size"):
    tarflow.token_shape((6, 6, 1), 4)


def test_flat_vectors_are_one_token_per_coordinate():
  """(The train step of the non-finite test runs a flow on flat data.)"""
  model = tarflow.TarFlow(image_shape=(3,))
  x = jnp.arange(6.0).reshape(2, 3)
  assert model.token_shape == (3, 1)
  assert model.to_tokens(x).shape == (2, 3, 1)
  np.testing.assert_array_equal(model.from_tokens(model.to_tokens(x)), x)


@pytest.mark.parametrize("rule", ["starflow", "tarflow"])
def test_attention_temperature_is_the_same_in_every_decoder(flow, rule):
  """With an attention temperature (on every pass, or the unconditional pass only for the
  TarFlow rules) the cached, naive and exact-Jacobi decoders agree, and the temperature
  changes the guided samples."""
  model, params, x, cond, forward = flow
  z, _, _ = forward(params, x, cond)
  run = jax.jit(lambda p, z, c, method, temperature: autoregressive.invert(
      model, p, z, c, method=method, guidance=1.0, null_label=null_of(model), rule=rule,
      chunk_size=4, tolerance=1e-30, attention_temperature=temperature)[0],
      static_argnums=(3, 4))
  cached = run(params, z, cond, "kv_cache", 0.5)
  # Guidance and a sharper attention amplify float32 rounding: agreement to 1e-4 (5e-4 for the
  # text model under the TarFlow rule, whose decoders differ by 2.7e-4 with a float32 transformer
  # and by 2e-5 with a float64 one).
  tol = 5e-4 if model.text_dim else 1e-4
  np.testing.assert_allclose(run(params, z, cond, "naive", 0.5), cached, rtol=tol, atol=tol)
  np.testing.assert_allclose(run(params, z, cond, "jacobi", 0.5), cached, rtol=tol, atol=tol)
  assert float(jnp.max(jnp.abs(cached - run(params, z, cond, "kv_cache", 1.0)))) > 1e-3


@pytest.mark.parametrize("hidden_slot, first_slot", [(-1, 0), (1, 0), (-1, 3)])
def test_causal_attention_in_two_halves_is_the_masked_attention(monkeypatch, hidden_slot,
                                                                first_slot):
  """Without a cache, 2 x CAUSAL_SPLIT_MIN or more tokens attend in two halves; the values and
  gradients are those of one masked attention over all of them (a hidden slot, slots not
  starting at 0), to float32 rounding."""
  length = 2 * tarflow.CAUSAL_SPLIT_MIN + 3
  x = jax.random.normal(jax.random.key(0), (2, length, 32))
  slots = first_slot + jnp.arange(length)
  layer = tarflow.CausalAttention(num_heads=2, hidden_slot=hidden_slot)
  params = perturb(layer.init(jax.random.key(1), x, slots, None))
  cotangent = jax.random.normal(jax.random.key(2), x.shape)

  def value_and_grads():
    loss = lambda p, x: jnp.sum(layer.apply(p, x, slots, None)[0] * cotangent)
    return layer.apply(params, x, slots, None)[0], jax.grad(loss, (0, 1))(params, x)

  halves = value_and_grads()
  monkeypatch.setattr(tarflow, "CAUSAL_SPLIT_MIN", length)
  whole = value_and_grads()
  for a, b in zip(jax.tree.leaves(halves), jax.tree.leaves(whole)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-5)


def test_remat_gives_the_same_gradients_and_keeps_fewer_activations():
  """model.remat recomputes each transformer layer's activations in the backward pass: the same
  loss gradients, and far fewer bytes kept from the forward pass for the backward one (the
  residuals of jax.vjp; XLA:CPU's memory analysis does not show rematerialisation)."""
  x = jax.random.normal(jax.random.key(0), (8, 8, 8, 2))

  def gradient(remat):
    model = tarflow.TarFlow(image_shape=(8, 8, 2), hidden_size=64, num_blocks=2,
                            layers_per_block=4, num_heads=4, remat=remat)
    params = jax.jit(model.init)(jax.random.key(1), x, None)["params"]
    params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(2), p.shape),
                          params)

    def loss(p):
      z, logdet, _ = model.apply({"params": p}, x, None)
      return jnp.mean(z ** 2) - jnp.mean(logdet)

    # The residuals jax.vjp keeps, by shape alone (nothing runs); the gradient compiled.
    kept = jax.eval_shape(lambda p: jax.tree.leaves(jax.vjp(loss, p)[1]), params)
    kept = sum(leaf.size * leaf.dtype.itemsize for leaf in kept)
    return jax.jit(jax.grad(loss))(params), kept

  plain, plain_bytes = gradient("none")
  for remat, most in (("full", 0.1), ("dots", 0.3)):
    grads, kept = gradient(remat)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(grads)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert kept < most * plain_bytes, (remat, kept, plain_bytes)


def test_rope_rotation_is_the_pair_rotation_and_leaves_no_cosines_in_the_step():
  """apply_rope with the host tables of rope_rotation rotates each channel pair by its angle (by
  hand, float64), and the gradient of a RoPE model and its KV-cached decoding step hold no
  cosine or sine: computed inside the step, XLA fuses them into every broadcast product that
  reads them and recomputes them per element."""
  angles = np.random.default_rng(0).uniform(-7.0, 7.0, (5, 3)).repeat(2, axis=1)
  x = np.random.default_rng(1).normal(size=(2, 5, 3, 6))
  pairs = x.reshape(2, 5, 3, 3, 2)
  cos, sin = np.cos(angles[None, :, None, 0::2]), np.sin(angles[None, :, None, 0::2])
  expected = np.stack([pairs[..., 0] * cos - pairs[..., 1] * sin,
                       pairs[..., 1] * cos + pairs[..., 0] * sin], axis=-1).reshape(x.shape)
  rotated = tarflow.apply_rope(jnp.asarray(x, jnp.float32),
                               jnp.asarray(tarflow.rope_rotation(angles)))
  np.testing.assert_allclose(rotated, expected, rtol=1e-5, atol=1e-5)

  model = make_model(**VARIANTS["starflow_official"])
  x = jnp.zeros((2,) + SHAPE)
  labels = jnp.zeros((2,), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, labels)["params"])

  def loss(p):
    z, logdet, _ = model.apply({"params": p}, x, labels)
    return jnp.mean(z ** 2) - jnp.mean(logdet)

  block = model.num_blocks - 1
  cache = jax.eval_shape(lambda: model.init_cache(2, block))
  step = lambda p, c: model.apply({"params": p}, block, x.reshape(2, 16, 2)[:, 0], 3, c, labels,
                                  method=tarflow.TarFlow.block_step)
  for program in (jax.make_jaxpr(jax.grad(loss))(params), jax.make_jaxpr(step)(params, cache)):
    primitives = _primitives(program.jaxpr)
    assert not primitives & {"cos", "sin"}, primitives & {"cos", "sin"}


def _primitives(jaxpr) -> set:
  """Every primitive of a jaxpr and of the jaxprs inside its equations."""
  found = set()
  for eqn in jaxpr.eqns:
    found.add(str(eqn.primitive))
    for value in eqn.params.values():
      for inner in value if isinstance(value, (list, tuple)) else [value]:
        inner = getattr(inner, "jaxpr", inner)
        if hasattr(inner, "eqns"):
          found |= _primitives(inner)
  return found
