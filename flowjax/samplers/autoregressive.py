"""Inversion of autoregressive flows (TarFlow / STARFlow), noise -> data, fused in lax loops.

The flow's blocks are inverted in reverse order (the last data -> noise block first). Inside a
block, token i is x_i = mu_i + sigma_i z_i where (mu_i, sigma_i) depend on x_{<i} only
(Zhai et al., arXiv:2412.06329; Gu et al., arXiv:2506.06276). Three decoders, all exact up to
float rounding:
- "kv_cache": one token per step of a `lax.scan`, with the preallocated KV cache of the model
  (L sequential network calls of one token each);
- "jacobi": chunks of `chunk_size` tokens (the last one the remainder) iterated to a fixed point
  in a `lax.while_loop`, every token's first guess being its noise (||x_new - x||^2 /
  ||x_new||^2 < tolerance over the whole batch, at most `max_iterations` iterations per chunk),
  reusing the cache of the finished chunks; a chunk is exact after at most chunk_size iterations;
- "naive": the full causal pass over all L tokens for every token (no cache), the reference.

Classifier-free guidance runs the conditional and the null-label (unconditional) halves as one
batch of 2B, so the KV cache holds a second, null-condition cache; at every token the two affine
maps are combined by a rule (weight w >= 0; w = 0 is the conditional model) and both halves
continue from the guided token. Only blocks that read the label are guided.

The model must follow the flow contract of `flowjax.models.tarflow` (to_tokens, from_tokens,
permute, init_cache, prefill_cache, block_chunk, block_step, block_sequence, block_conditioned,
num_blocks,
start_token, token_shape).
"""

import jax
import jax.numpy as jnp

METHODS = ("kv_cache", "jacobi", "naive")
GUIDANCE_RULES = ("starflow", "tarflow", "tarflow_shift")


def _unknown(kind, value, allowed):
  from flowjax.registry import unknown_name_message
  return unknown_name_message(kind, value, list(allowed))


def starflow_guidance(mu_c, sigma_c, mu_u, sigma_u, w):
  """STARFlow's per-token rule: the Gaussian proportional to p_c^(1 + w) / p_u^w.

  With q = min(sigma_c / sigma_u, 1)^2: sigma = sigma_c / sqrt(1 + w - w q) and
  mu = ((1 + w) mu_c - w q mu_u) / (1 + w - w q). For sigma_c < sigma_u this is exactly the
  normalised product; q is clipped at 1 so that the precision stays positive. All float32.
  """
  q = jnp.square(jnp.minimum(sigma_c / sigma_u, 1.0))
  denominator = 1.0 + w - w * q
  return ((1.0 + w) * mu_c - w * q * mu_u) / denominator, sigma_c / jnp.sqrt(denominator)


def tarflow_guidance(mu_c, sigma_c, mu_u, sigma_u, w):
  """TarFlow's rule: linear extrapolation of the shift and of the log-scale,
  mu = mu_c + w (mu_c - mu_u), log sigma = log sigma_c + w (log sigma_c - log sigma_u)."""
  log_sigma = jnp.log(sigma_c) + w * (jnp.log(sigma_c) - jnp.log(sigma_u))
  return mu_c + w * (mu_c - mu_u), jnp.exp(log_sigma)


def tarflow_shift_guidance(mu_c, sigma_c, mu_u, sigma_u, w):
  """TarFlow's rule on the shift only (its guide_what='b'): mu = mu_c + w (mu_c - mu_u),
  sigma = sigma_c."""
  del sigma_u
  return mu_c + w * (mu_c - mu_u), sigma_c


RULES = {"starflow": starflow_guidance, "tarflow": tarflow_guidance,
         "tarflow_shift": tarflow_shift_guidance}
# Rules whose attention temperature applies to the unconditional pass only (TarFlow); with
# "starflow" it applies to every pass.
UNCONDITIONAL_TEMPERATURE = ("tarflow", "tarflow_shift")


def guidance_weights(positions, length: int, start_token: bool, weight: float, anneal: bool):
  """Per-token weight w of `positions` ([T] int32): constant, or with `anneal` rising linearly to
  `weight` at the last token: w (t + 1 - t0) / (L - t0), t0 = 0 with a start token, 1 without
  (token 0 is then not transformed). Returns [T] float32."""
  positions = jnp.asarray(positions, jnp.float32)
  if not anneal:
    return jnp.full(positions.shape, weight, jnp.float32)
  first = 0 if start_token else 1
  return weight * jnp.clip((positions + 1 - first) / (length - first), 0.0, 1.0)


def invert(model, params, z, cond=None, *, method: str = "kv_cache",
           guidance: float | None = None,
           rule: str = "starflow", anneal: bool = False, null_label=None,
           chunk_size: int = 16, tolerance: float = 1e-3, max_iterations: int = 32,
           attention_temperature: float = 1.0):
  """Noise -> data through every block of an autoregressive flow.

  Args:
    model: a flow module with the contract above; params: its (unboxed) parameters.
    z: [B, *image_shape] noise (any values: the exact inverse of model's forward map).
    cond: int labels [B], text features [B, T, D] (a text model) or None.
    method: "kv_cache" | "jacobi" | "naive".
    guidance: None (no guidance), or the weight w >= 0 of `rule` ("starflow" | "tarflow"):
      the conditional and null-label halves are decoded together and combined at every token
      (w = 0 reproduces the conditional model). Used only with a condition; needs
      `null_label`: the label table's null index, or a text model's null caption features
      [T, D] (the features of an empty caption).
    anneal: raise w linearly over the tokens (see guidance_weights).
    attention_temperature: attention logits are divided by it: in every pass with the
      "starflow" rule, in the unconditional pass of guided sampling with the TarFlow rules (as
      the official samplers do); 1 = off.
    chunk_size, tolerance, max_iterations: Jacobi settings; the tokens are decoded in chunks of
      chunk_size from the first, the last chunk holding the remainder.
  Returns:
    (x: [B, *image_shape] float32, steps: int32 scalar, the number of sequential network
    evaluations: L per block for "kv_cache" and "naive", the Jacobi iterations for "jacobi").
  """
  if method not in METHODS:
    raise ValueError("sample.method: " + _unknown("autoregressive sampling method", method,
                                                  METHODS))
  if rule not in RULES:
    raise ValueError("objective.guidance_rule: " + _unknown("guidance rule", rule, RULES))
  if isinstance(guidance, (int, float)) and guidance < 0:
    raise ValueError(f"guidance weight w={guidance} must be >= 0 (sample.guidance = 1 + w).")
  guided = cond is not None and guidance is not None
  if guided and null_label is None:
    raise ValueError("Guided sampling needs null_label: the index of the null class, or a text "
                     "model's null caption features [T, D].")
  batch = z.shape[0]
  length, _ = model.token_shape
  apply = lambda name, *args: model.apply({"params": params}, *args, method=name)

  tokens = model.to_tokens(z.astype(jnp.float32))
  if guided:
    tokens = jnp.concatenate([tokens, tokens])
    null = jnp.broadcast_to(jnp.asarray(null_label, cond.dtype), cond.shape)
    cond = jnp.concatenate([cond, null])
  temperature = None
  if attention_temperature != 1.0:
    rows = tokens.shape[0]
    temperature = jnp.full((rows,), attention_temperature, jnp.float32)
    if rule in UNCONDITIONAL_TEMPERATURE:
      temperature = (jnp.concatenate([jnp.ones((batch,)), temperature[batch:]]) if guided
                     else None)

  def combine(block_index, mu, sigma, positions):
    """Guided (mu, sigma) for both halves; mu, sigma: [2B, T, C]; positions: [T]."""
    if not (guided and model.block_conditioned(block_index)):
      return mu, sigma
    w = guidance_weights(positions, length, model.start_token, guidance, anneal)[None, :, None]
    mu_c, mu_u = jnp.split(mu, 2)
    sigma_c, sigma_u = jnp.split(sigma, 2)
    mu, sigma = RULES[rule](mu_c, sigma_c, mu_u, sigma_u, w)
    return jnp.concatenate([mu, mu]), jnp.concatenate([sigma, sigma])

  steps = jnp.zeros((), jnp.int32)
  for block_index in reversed(range(model.num_blocks)):
    noise = model.permute(block_index, tokens)
    if method == "kv_cache":
      decoded, block_steps = _decode_cached(apply, model, block_index, noise, cond, combine,
                                            temperature)
    elif method == "naive":
      decoded, block_steps = _decode_naive(apply, block_index, noise, cond, combine,
                                           temperature)
    else:
      decoded, block_steps = _decode_jacobi(apply, model, block_index, noise, cond, combine,
                                            chunk_size, tolerance, max_iterations, temperature)
    tokens = model.permute(block_index, decoded)
    steps = steps + block_steps
  return model.from_tokens(tokens[:batch]), steps


def _decode_cached(apply, model, block_index, noise, cond, combine, temperature):
  """Token by token with the block's KV cache: [B, L, C] noise -> [B, L, C] tokens."""
  length = noise.shape[1]
  cache = apply("prefill_cache", block_index, model.init_cache(noise.shape[0], block_index),
                cond, noise.shape[0], temperature)

  def step(carry, inputs):
    previous, cache = carry
    position, z_token = inputs
    mu, sigma, cache = apply("block_step", block_index, previous, position, cache, cond,
                             temperature)
    mu, sigma = combine(block_index, mu[:, None], sigma[:, None], position[None])
    x_token = mu[:, 0] + sigma[:, 0] * z_token
    return (x_token, cache), x_token

  start = (jnp.zeros_like(noise[:, 0]), cache)
  _, decoded = jax.lax.scan(step, start, (jnp.arange(length), jnp.swapaxes(noise, 0, 1)))
  return jnp.swapaxes(decoded, 0, 1), jnp.int32(length)


def _decode_naive(apply, block_index, noise, cond, combine, temperature):
  """Token by token, recomputing the full causal pass each time (no cache)."""
  length = noise.shape[1]

  def step(x, position):
    mu, sigma = apply("block_sequence", block_index, x, cond, temperature)
    mu = jax.lax.dynamic_slice_in_dim(mu, position, 1, axis=1)
    sigma = jax.lax.dynamic_slice_in_dim(sigma, position, 1, axis=1)
    mu, sigma = combine(block_index, mu, sigma, position[None])
    z_token = jax.lax.dynamic_slice_in_dim(noise, position, 1, axis=1)
    return jax.lax.dynamic_update_slice_in_dim(x, mu + sigma * z_token, position, axis=1), None

  decoded, _ = jax.lax.scan(step, noise, jnp.arange(length))
  return decoded, jnp.int32(length)


def _decode_jacobi(apply, model, block_index, noise, cond, combine, chunk_size, tolerance,
                   max_iterations, temperature):
  """Chunks of chunk_size tokens (the last one holds the remainder) iterated to a fixed point, on
  top of the KV cache."""
  batch, length, _ = noise.shape
  chunk_size = max(1, min(chunk_size, length))

  def chunk(carry, start, size):
    x, cache, total = carry
    z_chunk = jax.lax.dynamic_slice_in_dim(noise, start, size, axis=1)
    previous = jax.lax.dynamic_slice_in_dim(x, jnp.maximum(start - 1, 0), 1, axis=1)

    def iterate(state):
      iteration, guess, cache, _ = state
      inputs = jnp.concatenate([previous, guess[:, :-1]], axis=1)
      mu, sigma, cache = apply("block_chunk", block_index, inputs, start, cache, cond,
                               temperature)
      mu, sigma = combine(block_index, mu, sigma, start + jnp.arange(size))
      new = mu + sigma * z_chunk
      change = jnp.sum(jnp.square(new - guess)) / jnp.maximum(jnp.sum(jnp.square(new)), 1e-30)
      return iteration + 1, new, cache, change

    def unfinished(state):
      iteration, _, _, change = state
      return (iteration < max_iterations) & (change >= tolerance)

    state = (jnp.int32(0), z_chunk, cache, jnp.float32(jnp.inf))
    iterations, decoded, cache, _ = jax.lax.while_loop(unfinished, iterate, state)
    x = jax.lax.dynamic_update_slice_in_dim(x, decoded, start, axis=1)
    return (x, cache, total + iterations), None

  cache = apply("prefill_cache", block_index, model.init_cache(batch, block_index), cond, batch,
                temperature)
  carry = (noise, cache, jnp.int32(0))
  full = length // chunk_size
  carry, _ = jax.lax.scan(lambda c, start: chunk(c, start, chunk_size), carry,
                          jnp.arange(0, full * chunk_size, chunk_size))
  if length % chunk_size:
    carry, _ = chunk(carry, jnp.int32(full * chunk_size), length % chunk_size)
  decoded, _, total = carry
  return decoded, total


def tweedie_denoise(log_density, x, noise_std: float):
  """Tweedie's step E[x_clean | x] = x + sigma_n^2 grad_x log p(x) for x = x_clean + sigma_n n.

  log_density: [B, ...] -> [B] log-density per example of the noisy data (the flow's own exact
  likelihood); x: [B, ...] noisy samples; noise_std: sigma_n. Returns [B, ...] float32.
  """
  x = x.astype(jnp.float32)
  score = jax.grad(lambda y: jnp.sum(log_density(y)))(x)
  return x + noise_std ** 2 * score
