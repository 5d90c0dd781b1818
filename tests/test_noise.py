"""The noise option (objective.noise, objective.noise_nu) of every noise-drawing objective:
Gaussian noise is bitwise the draw the objectives always made, the Student-t draw has the law of
Pandey et al. (arXiv:2410.14171), the exact t-Flow velocity is the minimiser of the flow-matching
loss with Student-t noise, iCT's and CTM's preconditioning follows t-EDM's at sigma sqrt(nu /
(nu - 2)), and the t-Flow experiment trains end to end."""

import dataclasses
import importlib.util
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from flowjax import objectives, train
from flowjax.data import pipeline
from flowjax.objectives import (common, consistency, ctm, flow_matching, imm, meanflow, scm,
                                shortcut, tvm)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The draw.

@pytest.mark.parametrize("shape, dtype", [((5, 2), None), ((3, 4, 4, 2), jnp.float32),
                                          ((7,), jnp.float32)])
def test_gaussian_noise_is_exactly_jax_random_normal(shape, dtype):
  """The default draw is jax.random.normal at the same key, shape and dtype, value for value,
  eagerly and under jit: with objective.noise='gaussian' every objective draws what it drew
  before the option existed."""
  key = jax.random.key(3)
  expected = jax.random.normal(key, shape, dtype)
  for draw in (common.draw_noise, jax.jit(common.draw_noise, static_argnums=(1, 2, 3, 4))):
    got = draw(key, shape, "gaussian", common.DEFAULT_NU, dtype)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(common.draw_noise(key, shape), expected)


def student_t(nu, num=40_000, dims=4, seed=0):
  """(eps, n): [num, dims] Student-t draws and the Gaussian draw of the same key, as float64."""
  key = jax.random.key(seed)
  eps = common.draw_noise(key, (num, dims), "student_t", nu, jnp.float32)
  n = jax.random.normal(key, (num, dims), jnp.float32)
  return np.asarray(eps, np.float64), np.asarray(n, np.float64)


@pytest.mark.parametrize("nu", [3.0, 10.0])
def test_student_t_scale_is_one_chi_square_per_example(nu):
  """eps = n / sqrt(kappa) with n the Gaussian draw of the same key and one kappa per example,
  shared by its dimensions, distributed as chi^2(nu) / nu."""
  eps, n = student_t(nu)
  ratio = n / eps  # sqrt(kappa), per dimension
  np.testing.assert_allclose(ratio, ratio[:, :1] * np.ones_like(ratio), rtol=1e-5)
  kappa = ratio[:, 0] ** 2
  assert stats.kstest(nu * kappa, stats.chi2(nu).cdf).pvalue > 1e-3
  np.testing.assert_allclose(kappa.mean(), 1.0, atol=4 * math.sqrt(2 / nu / len(kappa)))


@pytest.mark.parametrize("nu", [3.0, 10.0])
def test_student_t_marginals_and_tails_match_scipy(nu):
  """Each dimension is Student-t with nu degrees of freedom: a KS test, and the 0.99 and 0.999
  quantiles of |eps| against scipy.stats.t; for nu = 10 also the variance nu / (nu - 2) and the
  excess kurtosis 6 / (nu - 4). A Gaussian of the same variance fails the tail check."""
  eps, n = student_t(nu, num=100_000, dims=2)
  values = eps.ravel()
  law = stats.t(nu)
  assert stats.kstest(values[:20_000], law.cdf).pvalue > 1e-3
  for q, rtol in ((0.99, 0.03), (0.999, 0.08)):
    np.testing.assert_allclose(np.quantile(np.abs(values), q), law.ppf(0.5 + q / 2), rtol=rtol)
  gaussian = n.ravel() * math.sqrt(nu / (nu - 2))
  assert abs(np.quantile(np.abs(gaussian), 0.999) / law.ppf(0.9995) - 1) > 0.08
  if nu == 10.0:
    np.testing.assert_allclose(values.var(), nu / (nu - 2), rtol=0.03)
    np.testing.assert_allclose(stats.kurtosis(values), 6 / (nu - 4), atol=0.25)


def test_squared_norm_per_dimension_is_f_distributed():
  """||eps||^2 / D ~ F(D, nu) for the multivariate t_D(0, I, nu) (one shared kappa): a draw
  with an independent kappa per dimension has Student-t marginals too, but fails this."""
  nu, dims = 3.0, 8
  eps, _ = student_t(nu, num=20_000, dims=dims, seed=1)
  statistic = np.sum(eps ** 2, axis=1) / dims
  assert stats.kstest(statistic, stats.f(dims, nu).cdf).pvalue > 1e-3


def test_large_nu_draw_converges_to_the_gaussian_draw_of_the_same_key():
  """kappa -> 1 as nu grows, so the Student-t draw approaches the Gaussian one pathwise."""
  for nu, bound in ((1e4, 0.06), (1e8, 1e-3)):
    eps, n = student_t(nu, num=2000)
    assert np.max(np.abs(eps / n - 1)) < bound


def test_student_t_draw_does_not_depend_on_how_the_batch_is_sharded():
  """Global key and global shape: the draw sharded over 8 devices along the batch is the draw
  on one device (threefry_partitionable, as the trainer runs)."""
  mesh = jax.make_mesh((8,), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  draw = lambda key: common.draw_noise(key, (32, 3), "student_t", 3.0, jnp.float32)
  key = jax.random.key(9)
  sharded = jax.jit(draw, out_shardings=sharding)(key)
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_array_equal(sharded, jax.jit(draw)(key))


@pytest.mark.parametrize("nu", [2.0, 1.5, 0.0, -3.0, math.inf, math.nan, "3", True, None])
def test_noise_nu_at_or_below_two_or_not_finite_is_an_error_naming_the_key(nu):
  with pytest.raises(ValueError, match=r"objective\.noise_nu=.*nu > 2"):
    common.check_noise("student_t", nu)
  with pytest.raises(ValueError, match=r"objective\.noise_nu"):
    flow_matching.FlowMatching(model=None, image_shape=(2,), num_classes=0, noise="student_t",
                               noise_nu=nu)
  common.check_noise("gaussian", nu)  # nu is read only with Student-t noise


def test_an_unknown_noise_name_is_an_error_with_a_suggestion():
  with pytest.raises(ValueError, match=r"objective\.noise.*'student_t'"):
    common.check_noise("studentt", 3.0)
  config = objectives.default_config("imm")
  config.noise = "student-t"
  with pytest.raises(ValueError, match=r"objective\.noise"):
    objectives.build(config, None, pipeline.DataInfo(image_shape=(2,), num_classes=0,
                                                     num_examples=None))


# Every objective.

class Tiny(nn.Module):
  """A small smooth stand-in for the backbone contract, for any number of times."""

  @nn.compact
  def __call__(self, x, times, cond, *, train):
    del cond, train
    features = jnp.concatenate([x] + [t[:, None] for t in times], axis=-1)
    return nn.Dense(x.shape[-1])(jnp.tanh(nn.Dense(16)(features)))


BASE = dict(image_shape=(2,), num_classes=0)
# name: (objective, sampler arguments that reach each of its noise draws: start and re-noising).
OBJECTIVES = {
    "flow_matching": (lambda: flow_matching.FlowMatching(model=Tiny(), **BASE),
                      dict(num_steps=3)),
    "imm": (lambda: imm.IMM(model=Tiny(), group_size=4, **BASE),
            dict(num_steps=2, method="restart")),
    "meanflow": (lambda: meanflow.MeanFlow(model=Tiny(), **BASE), dict(num_steps=2)),
    "imf": (lambda: meanflow.MeanFlow(model=Tiny(), variant="imf", **BASE), dict(num_steps=2)),
    "shortcut": (lambda: shortcut.Shortcut(model=Tiny(), target_ema="current", **BASE),
                 dict(num_steps=2)),
    "consistency": (lambda: consistency.Consistency(model=Tiny(), total_steps=100, **BASE),
                    dict(num_steps=3)),
    "ctm": (lambda: ctm.CTM(model=Tiny(), teacher_model=Tiny(), num_scales=8, max_heun_steps=3,
                            adaptive_layer="Dense_1", sample_gamma=0.5, **BASE),
            dict(num_steps=3)),
    "sct": (lambda: scm.SCM(model=Tiny(), **BASE), dict(num_steps=2)),
    "scd": (lambda: scm.SCM(model=Tiny(), mode="scd", teacher_model=Tiny(), **BASE),
            dict(num_steps=2)),
    "tvm": (lambda: tvm.TVM(model=Tiny(), target_ema="current", **BASE), dict(num_steps=2)),
}
BATCH = {"image": 1.5 * jax.random.normal(jax.random.key(7), (16, 2))}


def outputs(objective, sample_args):
  """(loss, gradient leaves, samples) at fixed keys, as NumPy arrays."""
  params, extra = jax.jit(lambda k: nn.meta.unbox(objective.init(k, BATCH)))(jax.random.key(0))
  view = {"ema": {"0.999": params}, "extra": extra, "step": jnp.asarray(3)}
  loss_fn = lambda p, k: objective.loss(p, BATCH, k, 3, view)[0]
  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, jax.random.key(1))
  samples = jax.jit(lambda p, k: objective.sample(p, k, 8, None, **sample_args))(
      params, jax.random.key(2))
  return [np.asarray(loss)] + [np.asarray(g) for g in jax.tree.leaves(grads)] + [
      np.asarray(samples)]


class Spy:
  """Records the noise draws of a trace: every draw_noise call and every jax.random.normal call
  of a data-shaped array ([B, 2]) made outside draw_noise."""

  def __init__(self, monkeypatch, replacement=None):
    self.calls, self.bypasses, self.inside = [], [], False
    draw, normal = common.draw_noise, jax.random.normal

    def draw_noise(rng, shape, kind="gaussian", nu=common.DEFAULT_NU, dtype=None):
      self.calls.append((tuple(shape), kind, nu))
      self.inside = True
      try:
        return (replacement or draw)(rng, shape, kind, nu, dtype)
      finally:
        self.inside = False

    def spied_normal(key, shape=(), dtype=None, **kwargs):
      if not self.inside and len(shape) == 2 and shape[1:] == BASE["image_shape"]:
        self.bypasses.append(tuple(shape))
      return normal(key, shape, dtype, **kwargs)

    monkeypatch.setattr(common, "draw_noise", draw_noise)
    monkeypatch.setattr(jax.random, "normal", spied_normal)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_gaussian_default_is_bitwise_the_old_draw_and_every_draw_takes_the_option(
    name, monkeypatch):
  """With the default objective.noise='gaussian', loss, gradients and samples are bitwise those
  of the old code path, in which every noise draw was jax.random.normal(key, shape, dtype); every
  data-shaped draw of the loss and of the sampler (start and re-noising) goes through
  common.draw_noise; and with noise='student_t' each of those draws is Student-t with the
  configured nu, and the outputs change."""
  make, sample_args = OBJECTIVES[name]
  default = make()
  assert (default.noise, default.noise_nu) == ("gaussian", common.DEFAULT_NU)
  new = outputs(default, sample_args)
  with monkeypatch.context() as patch:
    old_draw = lambda rng, shape, kind, nu, dtype=None: jax.random.normal(rng, shape, dtype)
    spy = Spy(patch, old_draw)
    old = outputs(make(), sample_args)
  assert not spy.bypasses, f"{name} draws noise of shape {spy.bypasses} without draw_noise"
  assert {kind for _, kind, _ in spy.calls} == {"gaussian"}
  # At least one draw in the loss and one at the sampler's start (shape [8, 2]).
  assert any(shape[0] == 16 for shape, _, _ in spy.calls)
  assert any(shape[0] == 8 for shape, _, _ in spy.calls)
  assert len(new) == len(old)
  for a, b in zip(new, old):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)

  with monkeypatch.context() as patch:
    spy = Spy(patch)
    heavy = outputs(dataclasses.replace(default, noise="student_t", noise_nu=3.0), sample_args)
  assert not spy.bypasses
  assert spy.calls and {(kind, nu) for _, kind, nu in spy.calls} == {("student_t", 3.0)}
  assert all(np.all(np.isfinite(a)) for a in heavy)
  assert not np.array_equal(heavy[0], new[0]) and not np.array_equal(heavy[-1], new[-1])


def test_every_noise_drawing_objective_has_the_noise_keys():
  for name in ("flow_matching", "imm", "meanflow", "shortcut", "consistency", "ctm", "scm",
               "tvm"):
    config = objectives.default_config(name)
    assert (config.noise, config.noise_nu) == ("gaussian", common.DEFAULT_NU), name


def test_a_distilling_objective_refuses_a_teacher_of_another_noise(tmp_path):
  """CTM and sCD carry x_t along the teacher's PF-ODE, which is that of the teacher's noise."""
  def teacher(**noise):
    workdir = tmp_path / "_".join(f"{k}{v}" for k, v in noise.items()) if noise else tmp_path
    workdir.mkdir(exist_ok=True)
    objective = dict(name="flow_matching", path="ot", **noise)
    (workdir / "config.json").write_text(json.dumps({"objective": objective}))
    return str(workdir)

  old = teacher()  # a config from before the noise keys: Gaussian
  ctm.check_teacher_noise(old, "gaussian", 10.0)
  with pytest.raises(ctm.TeacherError, match=r"gaussian noise.*objective\.noise='student_t'"):
    ctm.check_teacher_noise(old, "student_t", 3.0)
  heavy = teacher(noise="student_t", noise_nu=3.0)
  ctm.check_teacher_noise(heavy, "student_t", 3.0, "sCD")
  with pytest.raises(ctm.TeacherError, match=r"student_t with nu=3 noise.*sCD.*noise_nu=5"):
    ctm.check_teacher_noise(heavy, "student_t", 5.0, "sCD")
  with pytest.raises(ctm.TeacherError):
    ctm.check_teacher_noise(heavy, "gaussian", 10.0)



# t-EDM preconditioning.

class Probe(nn.Module):
  """A backbone whose output reads off one of its inputs: "zero" 0, "one" 1, "input" its input
  c_in x, "times" its first and last time, one per output dimension."""
  read: str

  @nn.compact
  def __call__(self, x, times, cond, *, train):
    del cond, train
    if self.read == "input":
      return x
    if self.read == "times":
      return jnp.stack([times[0], times[-1]], axis=-1)
    return jnp.full_like(x, 0.0 if self.read == "zero" else 1.0)


def read_coefficients(denoiser):
  """(c_skip, c_out, c_in, times) of d(x) = c_skip x + c_out F(c_in x, times): [B] each ([B, 2]
  for the times), read off with the probes; denoiser: (backbone, x) -> d(x)."""
  out = {read: np.asarray(denoiser(Probe(read), PROBE_X), np.float64)
         for read in ("zero", "one", "input", "times")}
  x = np.asarray(PROBE_X, np.float64)
  c_skip = out["zero"][:, 0] / x[:, 0]
  c_out = out["one"][:, 0] - out["zero"][:, 0]
  c_in = (out["input"][:, 0] - out["zero"][:, 0]) / (c_out * x[:, 0])
  times = (out["times"] - out["zero"]) / c_out[:, None]
  return c_skip, c_out, c_in, times


SIGMAS = np.array([0.01, 0.3, 2.0, 40.0, 80.0])
PROBE_X = jnp.asarray(np.stack([np.linspace(0.5, 2.5, len(SIGMAS))] * 2, axis=1), jnp.float32)


@pytest.mark.parametrize("nu", [3.0, 10.0])
def test_student_t_preconditioning_is_edm_at_the_noise_standard_deviation(nu):
  """With Student-t noise, iCT's and CTM's c_skip, c_out, c_in and backbone times are EDM's
  formulas at sigma_eff = sigma sqrt(nu / (nu - 2)) (t-EDM, arXiv:2410.14171; physicsnemo's
  tEDMPrecondSuperRes), computed here by hand: iCT's boundary form with sigma - sigma_min scaled
  the same way, CTM's times ln(t_eff) / 4 and ln(s_eff) / 4, and CTM's DSM weight
  (sigma_eff^2 + sd^2) / (sigma_eff sd)^2 = 1 / c_out^2. They are not the Gaussian ones."""
  scale = math.sqrt(nu / (nu - 2))
  sd, low, high = 0.5, 0.002, 80.0
  sigma = jnp.asarray(SIGMAS, jnp.float32)
  sigma64 = np.asarray(sigma, np.float64)

  def consistency_by_hand(factor):
    s, offset = sigma64 * factor, (sigma64 - low) * factor
    return (sd ** 2 / (offset ** 2 + sd ** 2), sd * offset / np.sqrt(s ** 2 + sd ** 2),
            1 / np.sqrt(s ** 2 + sd ** 2), (np.log(s) - np.log(low)) / np.log(high / low))

  heavy = consistency.Consistency(model=None, total_steps=100, noise="student_t", noise_nu=nu,
                                  **BASE)
  got = read_coefficients(lambda probe, x: dataclasses.replace(heavy, model=probe)
                          .consistency_fn({}, x, sigma, None))
  expected = consistency_by_hand(scale)
  for name, a, b in zip(("c_skip", "c_out", "c_in"), got[:3], expected[:3]):
    np.testing.assert_allclose(a, b, rtol=1e-4, err_msg=name)
  np.testing.assert_allclose(got[3], np.stack([expected[3]] * 2, axis=1), rtol=1e-4, atol=1e-6)
  gaussian = consistency_by_hand(1.0)
  for a, b in zip(got[:3], gaussian[:3]):
    assert not np.allclose(a, b, rtol=1e-3)

  heavy_ctm = ctm.CTM(model=None, noise="student_t", noise_nu=nu, **BASE)
  s_level = jnp.asarray(np.minimum(SIGMAS, 0.05), jnp.float32)
  got = read_coefficients(lambda probe, x: dataclasses.replace(heavy_ctm, model=probe)
                          .g_fn({}, x, sigma, s_level, None))
  t_eff, s_eff = sigma64 * scale, np.asarray(s_level, np.float64) * scale
  norm = t_eff ** 2 + sd ** 2
  for name, a, b in zip(("c_skip", "c_out", "c_in"), got[:3],
                        (sd ** 2 / norm, t_eff * sd / np.sqrt(norm), 1 / np.sqrt(norm))):
    np.testing.assert_allclose(a, b, rtol=1e-4, err_msg=name)
  np.testing.assert_allclose(got[3], np.stack([np.log(t_eff), np.log(s_eff)], axis=1) / 4,
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(heavy_ctm.dsm_weights(sigma), norm / (t_eff * sd) ** 2, rtol=1e-5)
  np.testing.assert_allclose(heavy_ctm.dsm_weights(sigma), 1 / got[1] ** 2, rtol=1e-4)
  assert not np.allclose(got[2], 1 / np.sqrt(sigma64 ** 2 + sd ** 2), rtol=1e-3)


def test_student_t_preconditioning_keeps_the_boundary_conditions_exactly():
  """f(x, sigma_min) = x for iCT and G(x, t, t) = x for CTM, bitwise, with Student-t noise and a
  random network, eagerly and compiled."""
  x = jax.random.normal(jax.random.key(4), (8, 2)) * 3.0
  for nu in (2.5, 3.0, 10.0):
    objective = dataclasses.replace(OBJECTIVES["consistency"][0](), noise="student_t", noise_nu=nu)
    params = nn.meta.unbox(objective.init(jax.random.key(0), {"image": x})[0])
    floor = jnp.full((8,), objective.sigma_min, jnp.float32)
    for f in (objective.consistency_fn, jax.jit(objective.consistency_fn)):
      np.testing.assert_array_equal(f(params, x, floor, None), x)
    trajectory = dataclasses.replace(OBJECTIVES["ctm"][0](), noise="student_t", noise_nu=nu)
    params = nn.meta.unbox(trajectory.init(jax.random.key(0), {"image": x})[0])
    t = jnp.geomspace(0.002, 80.0, 8).astype(jnp.float32)
    for G in (trajectory.trajectory_map, jax.jit(trajectory.trajectory_map)):
      np.testing.assert_array_equal(G(params, x, t, t, None), x)


def test_student_t_denoisers_approach_the_gaussian_ones_as_nu_grows():
  """sqrt(nu / (nu - 2)) -> 1: at nu = 1e6 iCT's f, CTM's g and G and CTM's DSM weight with
  Student-t preconditioning are the Gaussian ones (same parameters, same input) within float32
  rounding; at nu = 3 they are not."""
  x = jax.random.normal(jax.random.key(4), (8, 2)) * 3.0
  sigma = jnp.geomspace(0.01, 80.0, 8).astype(jnp.float32)
  s_level = jnp.full((8,), 0.005, jnp.float32)
  make_ct, make_ctm = OBJECTIVES["consistency"][0], OBJECTIVES["ctm"][0]
  ct_params = nn.meta.unbox(make_ct().init(jax.random.key(0), {"image": x})[0])
  ctm_params = nn.meta.unbox(make_ctm().init(jax.random.key(0), {"image": x})[0])

  def denoisers(**noise):
    ct = dataclasses.replace(make_ct(), **noise)
    trajectory = dataclasses.replace(make_ctm(), **noise)
    return [np.asarray(a) for a in (
        ct.consistency_fn(ct_params, x, sigma, None),
        trajectory.g_fn(ctm_params, x, sigma, s_level, None),
        trajectory.trajectory_map(ctm_params, x, sigma, s_level, None),
        trajectory.dsm_weights(sigma))]

  gaussian = denoisers()
  for a, b in zip(denoisers(noise="student_t", noise_nu=1e6), gaussian):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for a, b in zip(denoisers(noise="student_t", noise_nu=3.0), gaussian):
    assert not np.allclose(a, b, rtol=1e-2, atol=1e-3)


def test_gaussian_preconditioning_is_bitwise_edm_in_sigma():
  """With noise='gaussian' effective_sigma is sigma itself (no arithmetic), and iCT's scalings,
  CTM's g and its DSM weight are bitwise the EDM formulas in sigma they were before t-EDM's
  preconditioning existed."""
  sigma = jnp.asarray(SIGMAS, jnp.float32)
  assert common.effective_sigma(sigma, "gaussian", 3.0) is sigma
  objective = OBJECTIVES["consistency"][0]()
  data2, low = objective.sigma_data ** 2, objective.sigma_min
  old = (data2 / ((sigma - low) ** 2 + data2),
         objective.sigma_data * (sigma - low) / jnp.sqrt(sigma ** 2 + data2),
         1.0 / jnp.sqrt(sigma ** 2 + data2))
  for a, b in zip(objective.scalings(sigma), old):
    np.testing.assert_array_equal(a, b)
  echo = dataclasses.replace(objective, model=Probe("times"))
  np.testing.assert_array_equal(
      echo.consistency_fn({}, PROBE_X, sigma, None),
      old[0][:, None] * PROBE_X + old[1][:, None] * objective.backbone_time(sigma)[:, None])

  trajectory = dataclasses.replace(OBJECTIVES["ctm"][0](), model=Probe("input"))
  sd = trajectory.sigma_data
  t = sigma[:, None]
  norm = t ** 2 + sd ** 2
  x_in = 1.0 / jnp.sqrt(t ** 2 + sd ** 2) * PROBE_X
  np.testing.assert_array_equal(trajectory.g_fn({}, PROBE_X, sigma, sigma, None),
                                (sd ** 2 / norm) * PROBE_X + (t * sd / jnp.sqrt(norm)) * x_in)
  np.testing.assert_array_equal(trajectory.dsm_weights(sigma),
                                (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2)


# t-Flow.

DATA_STD = 0.5
NU = 3.0
# log-spaced kappa grid for the posterior of the noise scale: kappa ~ Gamma(nu / 2, rate nu / 2).
KAPPA = np.geomspace(1e-5, 30.0, 400)
LOG_PRIOR = (stats.gamma(NU / 2, scale=2 / NU).logpdf(KAPPA) + np.log(KAPPA)).astype(np.float32)


def exact_t_flow_velocity(x_t, t):
  """E[eps - x | x_t] for x ~ N(0, s^2 I_D) and eps = n / sqrt(kappa), n ~ N(0, I_D), kappa ~
  chi^2(nu) / nu, on x_t = (1 - t) x + t eps. Given kappa, (eps - x, x_t) are jointly Gaussian:
  Var(x_t | kappa) = (1 - t)^2 s^2 + t^2 / kappa =: V, Cov = t / kappa - (1 - t) s^2, so
  E[v | x_t, kappa] = (t / kappa - (1 - t) s^2) / V x_t, averaged over p(kappa | x_t) propto
  p(kappa) N(x_t; 0, V I_D) (quadrature on KAPPA). x_t: [B, D]; t: [B]."""
  t = t[:, None]
  kappa = jnp.asarray(KAPPA)[None]
  var = (1 - t) ** 2 * DATA_STD ** 2 + t ** 2 / kappa  # [B, K]
  dims = x_t.shape[1]
  log_w = (LOG_PRIOR[None] - 0.5 * dims * jnp.log(var)
           - 0.5 * jnp.sum(x_t ** 2, axis=1, keepdims=True) / var)
  w = jax.nn.softmax(log_w, axis=1)
  slope = jnp.sum(w * (t / kappa - (1 - t) * DATA_STD ** 2) / var, axis=1)
  return slope[:, None] * x_t


def best_linear_velocity(x_t, t):
  """The best velocity linear in x_t (the Gaussian-noise optimum with the noise variance
  nu / (nu - 2) of Student-t noise): it ignores that kappa is shared by an example's dims."""
  t = t[:, None]
  noise_var = NU / (NU - 2)
  var = (1 - t) ** 2 * DATA_STD ** 2 + t ** 2 * noise_var
  return (t * noise_var - (1 - t) * DATA_STD ** 2) / var * x_t


class PerturbedVelocity(nn.Module):
  """v(x_t, t) + delta tanh(x_t) with one scalar parameter delta (0 at init)."""
  velocity: str = "exact"

  @nn.compact
  def __call__(self, x, times, cond, *, train):
    del cond, train
    delta = self.param("delta", nn.initializers.zeros, ())
    field = exact_t_flow_velocity if self.velocity == "exact" else best_linear_velocity
    return field(x, times[0]) + delta * jnp.tanh(x)


def loss_slope(velocity, noise="student_t", batches=8, size=16_384):
  """d loss / d delta at delta = 0 on `batches` independent batches of N(0, s^2 I_2) data:
  (mean, standard error, mean loss)."""
  objective = flow_matching.FlowMatching(model=PerturbedVelocity(velocity), image_shape=(2,),
                                         num_classes=0, noise=noise, noise_nu=NU)
  params = {"delta": jnp.zeros(())}

  @jax.jit
  def slope(key):
    data_key, loss_key = jax.random.split(key)
    batch = {"image": DATA_STD * jax.random.normal(data_key, (size, 2))}
    loss_fn = lambda p: objective.loss(p, batch, loss_key, 0, {})[0]
    loss, grad = jax.value_and_grad(loss_fn)(params)
    return grad["delta"], loss

  values = [slope(key) for key in jax.random.split(jax.random.key(11), batches)]
  grads = np.array([float(g) for g, _ in values])
  losses = [float(v) for _, v in values]
  return grads.mean(), grads.std(ddof=1) / math.sqrt(batches), np.mean(losses)


def test_exact_t_flow_velocity_is_the_minimiser_of_the_student_t_flow_matching_loss():
  """t-Flow's loss E ||v_theta(x_t, t) - (eps - x)||^2 with Student-t eps is minimised by the
  conditional mean E[eps - x | x_t], which for Gaussian data has the closed form above (a
  quadrature over the shared scale kappa): the loss's derivative along a perturbation vanishes
  there (within Monte Carlo error), and not at the best linear field, whose loss is higher."""
  mean, error, loss = loss_slope("exact")
  assert abs(mean) < 4 * error + 1e-4, (mean, error)
  linear_mean, linear_error, linear_loss = loss_slope("linear")
  assert abs(linear_mean) > 8 * linear_error, (linear_mean, linear_error)
  assert linear_loss > loss
  # The exact field of Student-t noise is not the minimiser under Gaussian noise.
  gaussian_mean, gaussian_error, _ = loss_slope("exact", noise="gaussian")
  assert abs(gaussian_mean) > 8 * gaussian_error, (gaussian_mean, gaussian_error)


class Zero(nn.Module):
  @nn.compact
  def __call__(self, x, times, cond, *, train):
    del times, cond, train
    return x * self.param("zero", nn.initializers.zeros, ())


def test_t_flow_samples_start_from_the_student_t_prior():
  """With a zero velocity the sampler returns its start: the Student-t draw of its key (the prior
  t_D(0, I, nu) at t = 1, as in the loss), bitwise when both are compiled."""
  objective = flow_matching.FlowMatching(model=Zero(), image_shape=(2,), num_classes=0,
                                         noise="student_t", noise_nu=4.0)
  params = {"zero": jnp.zeros(())}
  key = jax.random.key(5)
  samples = jax.jit(lambda p, k: objective.sample(p, k, 512, num_steps=2))(params, key)
  prior = jax.jit(lambda k: common.draw_noise(k, (512, 2), "student_t", 4.0))(key)
  np.testing.assert_array_equal(samples, prior)


# The experiment.

def test_the_t_flow_experiment_trains_end_to_end(tmp_path):
  spec = importlib.util.spec_from_file_location(
      "fm_toy2d_heavy", os.path.join(ROOT, "experiments", "fm_toy2d_heavy.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny")
  assert (config.objective.noise, config.objective.noise_nu) == ("student_t", 3.0)
  assert config.data.toy_distribution == "student_t"
  assert module.get_config("gaussian").objective.noise == "gaussian"
  state = train.run(config, str(tmp_path))
  assert int(state.step) == config.train.steps and int(state.skipped) == 0
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert records and all(np.isfinite(r["loss"]) for r in records)
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["objective"]["noise"] == "student_t" and saved["objective"]["noise_nu"] == 3.0
  assert (tmp_path / "samples" / f"step_{config.train.steps}.png").is_file()
