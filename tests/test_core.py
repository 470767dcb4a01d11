"""Noise schedules, step grids, scheduler config handling, bad input and dtypes."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from helpers import rel_err, run

import samplers
from samplers import ContinuousVPSchedule, DEISScheduler, DiscreteVPSchedule, DPMSolverPlusPlusScheduler, VESchedule
from samplers.solvers.grids import step_grid
from samplers.solvers.prediction import dynamic_threshold, from_data, to_data, to_noise
from samplers.testbeds import GaussianMixtureModel

SHAPE = (3, 8, 8)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_discrete_schedule_matches_diffusers_tables(beta_schedule, zero_snr):
    cfg = dict(beta_schedule=beta_schedule, rescale_betas_zero_snr=zero_snr)
    ref = DPMSolverMultistepScheduler(**cfg)
    sched = DiscreteVPSchedule.from_config(cfg)
    t = torch.arange(1000, dtype=torch.float64)
    alpha, sigma = sched.alpha_sigma(t)
    assert torch.allclose(alpha**2, ref.alphas_cumprod.double(), rtol=1e-12, atol=0)
    assert torch.allclose(alpha**2 + sigma**2, torch.ones(1000, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("schedule", [DiscreteVPSchedule.from_config({"beta_schedule": "squaredcos_cap_v2"}),
                                      ContinuousVPSchedule(), VESchedule()])
def test_lambda_inverse_roundtrip(schedule):
    t = torch.linspace(schedule.t_min, schedule.t_max, 257, dtype=torch.float64)
    back = schedule.t_from_lambda(schedule.lambda_(t))
    assert torch.allclose(back, t, rtol=1e-9, atol=1e-9 * schedule.t_max)


def test_fractional_timesteps_interpolate_log_alpha():
    sched = DiscreteVPSchedule.from_config({})
    la = sched.log_alpha(torch.tensor([10.0, 11.0, 10.25], dtype=torch.float64))
    assert torch.isclose(la[2], 0.75 * la[0] + 0.25 * la[1], rtol=1e-14)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("n", [1, 7, 10, 25, 100])
def test_spacing_grids_match_diffusers(spacing, n):
    ref = DPMSolverMultistepScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    ref.set_timesteps(n)
    ours = DPMSolverPlusPlusScheduler(timestep_schedule=spacing, steps_offset=1 if spacing == "leading" else 0)
    ours.set_timesteps(n)
    assert torch.equal(ours.timesteps, ref.timesteps)


def test_rounded_grid_with_repeated_timesteps_is_deduplicated():
    s = DPMSolverPlusPlusScheduler(timestep_schedule="linspace", solver_order=3)
    s.set_timesteps(1000)
    assert len(s.timesteps) == len(set(s.timesteps.tolist())) == s.num_inference_steps
    assert all(np.isfinite(step.b).all() for step in s._plan)


def test_logsnr_grid_is_uniform_in_lambda_and_karras_is_rho_spaced():
    sched = DiscreteVPSchedule.from_config({})
    ts = step_grid(sched, "logsnr", 10, ends_at_zero=False)
    lam = sched.lambda_(torch.from_numpy(ts)).numpy()
    assert len(ts) == 11 and ts[0] == 999 and ts[-1] == 0
    assert np.allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-9)
    ts = step_grid(sched, "karras", 10, ends_at_zero=True)
    sig = np.exp(-sched.lambda_(torch.from_numpy(ts[:-1])).numpy())
    assert np.allclose(np.diff(sig ** (1 / 7)), np.diff(sig ** (1 / 7))[0], rtol=1e-8)


@pytest.mark.parametrize("kind", samplers.solvers.grids.TIMESTEP_SCHEDULES)
def test_every_grid_is_strictly_decreasing(kind):
    for cfg in ({}, {"beta_schedule": "squaredcos_cap_v2"}, {"rescale_betas_zero_snr": True}):
        for n in (1, 5, 20):
            ts = step_grid(DiscreteVPSchedule.from_config(cfg), kind, n)
            assert len(ts) == n + 1 and np.all(np.diff(ts[:-1]) < 0), (kind, cfg, n, ts)


def test_cosine_schedule_with_karras_runs(float64_default):
    """diffusers' multistep solvers crash with squaredcos_cap_v2 + Karras sigmas (a diffusers defect we avoid)."""
    cfg = dict(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True)
    model = GaussianMixtureModel.for_scheduler_config(cfg, shape=SHAPE)
    for n in (5, 10, 20):
        x = run(DPMSolverPlusPlusScheduler(**cfg), model, torch.randn(2, *SHAPE), n)
        assert torch.isfinite(x).all()


def test_lu_lambdas_with_sigma_min_third_order_is_finite(float64_default):
    """diffusers returns NaN for 3M + uniform lambda + sigma_min (duplicate timesteps, h = 0)."""
    model = GaussianMixtureModel(shape=SHAPE)
    s = DPMSolverPlusPlusScheduler(solver_order=3, final_sigmas_type="sigma_min", lower_order_final=False)
    x = run(s, model, torch.randn(2, *SHAPE), 10)
    assert torch.isfinite(x).all()
    assert len(set(s.timesteps.tolist())) == 10


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_conversions_roundtrip(prediction_type):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.randn(2, 5, generator=g, dtype=torch.float64)
    alpha, sigma = 0.6, 0.8
    x = alpha * x0 + sigma * eps
    out = from_data(x0, x, alpha, sigma, prediction_type)
    assert torch.allclose(to_data(out, x, alpha, sigma, prediction_type), x0, atol=1e-12)
    assert torch.allclose(to_noise(out, x, alpha, sigma, prediction_type), eps, atol=1e-12)


def test_dynamic_threshold_matches_diffusers():
    ref = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0)
    x0 = 3 * torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(dynamic_threshold(x0, 0.9, 2.0), ref._threshold_sample(x0), atol=1e-6)


@pytest.mark.parametrize("source", [DDPMScheduler, DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_from_config_of_any_diffusers_scheduler(source, tmp_path):
    cfg = source(beta_schedule="scaled_linear", prediction_type="v_prediction").config
    for cls in samplers.SCHEDULERS.values():
        s = cls.from_config(cfg)
        assert s.config.beta_schedule == "scaled_linear" and s.config.prediction_type == "v_prediction"
        s.save_pretrained(tmp_path / cls.__name__)
        loaded = cls.from_pretrained(tmp_path / cls.__name__)
        public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
        assert public(loaded.config) == public(s.config)


def test_registry_names():
    assert samplers.SCHEDULERS["dpmsolver++"] is DPMSolverPlusPlusScheduler


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(solver_order=4), "solver_order"),
        (dict(solver_order=0), "solver_order"),
        (dict(prediction_type="flow"), "prediction_type"),
        (dict(timestep_schedule="cubic"), "timestep_schedule"),
        (dict(final_sigmas_type="one"), "final_sigmas_type"),
        (dict(beta_schedule="quadratic"), "beta_schedule"),
        (dict(algorithm_type="dpmsolver"), "algorithm_type"),
        (dict(solver_type="rk4"), "solver_type"),
    ],
)
def test_bad_config_is_rejected_with_the_argument_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DPMSolverPlusPlusScheduler(**kwargs)


@pytest.mark.parametrize("n", [0, -3, 1001])
def test_bad_step_counts(n):
    with pytest.raises(ValueError, match="num_inference_steps"):
        DPMSolverPlusPlusScheduler().set_timesteps(n)


def test_step_misuse_errors():
    s = DPMSolverPlusPlusScheduler()
    x = torch.randn(2, *SHAPE)
    with pytest.raises(RuntimeError, match="before set_timesteps"):
        s.step(x, 999, x)
    with pytest.raises(TypeError, match="num_inference_steps must be an int"):
        s.set_timesteps(2.5)
    s.set_timesteps(2)
    with pytest.raises(ValueError, match="does not match sample shape"):
        s.step(torch.randn(2, 3, 4, 4), s.timesteps[0], x)
    s.step(x, s.timesteps[0], x)
    s.step(x, s.timesteps[1], x)
    with pytest.raises(RuntimeError, match="called 3 times"):
        s.step(x, 0, x)


def test_nan_model_output_is_reported_with_step_index():
    model = GaussianMixtureModel(shape=SHAPE)

    def broken(x, t):
        out = model(x, t).sample
        return out * float("nan") if float(t) < 500 else out

    with pytest.raises(FloatingPointError, match=r"step 6 \(timestep 400.000\) contains NaN or Inf; 4 of 10"):
        samplers.sample(broken, DPMSolverPlusPlusScheduler(timestep_schedule="linspace"), torch.randn(2, *SHAPE), 10)
    s = DPMSolverPlusPlusScheduler(check_finite=True)
    s.set_timesteps(4)
    x = torch.randn(1, *SHAPE)
    with pytest.raises(FloatingPointError, match="step 0"):
        s.step(torch.full_like(x, float("inf")), s.timesteps[0], x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_model_keeps_float32_state(dtype):
    model = GaussianMixtureModel(shape=SHAPE)
    x = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    full = run(DPMSolverPlusPlusScheduler(solver_order=3), model, x.double(), 10)
    s = DPMSolverPlusPlusScheduler(solver_order=3)
    low = run(s, lambda xx, t: model(xx.to(dtype), t), x.to(dtype), 10)
    assert low.dtype == dtype and s._state.dtype == torch.float32
    naive_err = rel_err(full.to(dtype), full)  # the unavoidable rounding of the output itself
    assert rel_err(low, full) < 4 * naive_err + 1e-2


def test_full_float64_run_and_sample_loop_nfe():
    model = GaussianMixtureModel(shape=SHAPE)
    noise = torch.randn(3, *SHAPE, dtype=torch.float64)
    out = samplers.sample(model, DPMSolverPlusPlusScheduler(solver_order=3), noise, 7)
    assert out.samples.dtype == torch.float64 and out.nfe == 7 == model.num_calls


def test_sde_samples_depend_only_on_their_seed():
    model = GaussianMixtureModel(shape=SHAPE)
    seeds = [11, 12, 13, 14]

    def go(batch):
        s = DPMSolverPlusPlusScheduler(algorithm_type="sde-dpmsolver++")
        return samplers.sample(model, s, samplers.noise_from_seeds(batch, SHAPE), 8,
                               generator=samplers.per_sample_generators(batch)).samples

    whole = go(seeds)
    halves = torch.cat([go(seeds[:2]), go(seeds[2:])])
    assert torch.equal(whole, halves)


def test_sde_noise_stream_is_not_the_initial_noise_stream():
    noise = samplers.noise_from_seeds([5], SHAPE, dtype=torch.float64)
    (gen,) = samplers.per_sample_generators([5])
    first_sde_draw = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    assert not torch.allclose(first_sde_draw, noise[0])


# ---------------------------------------------------------------------------------------------- final step order
FINAL_STEP_SOLVERS = [
    (DPMSolverPlusPlusScheduler, dict(solver_order=3)),  # data (x0) history: eps_j from the kept states
    (samplers.DEISScheduler, dict(solver_order=3, solver_type="tab")),  # noise history
    (samplers.UniPCScheduler, dict(solver_order=3, disable_corrector=[0, 1, 2, 3])),  # x0 history, no corrector
    (samplers.UniPCScheduler, dict(solver_order=3, predict_x0=False, disable_corrector=[0, 1, 2, 3])),
]


def _drive(scheduler, model, states, timesteps):
    """Step through ``timesteps`` feeding the given state at each evaluation; returns the final output."""
    scheduler.set_timesteps(timesteps=timesteps)
    for t, x in zip(scheduler.timesteps, states):
        out = scheduler.step(model(x, t).sample, t, x).prev_sample
    return out


def _times_at_rho(schedule, rho):
    return schedule.t_from_lambda(-torch.log(torch.as_tensor(rho, dtype=torch.float64))).numpy()


@pytest.mark.parametrize("cls, kw", FINAL_STEP_SOLVERS)
@pytest.mark.parametrize("k", [2, 3])
def test_final_step_integrates_polynomial_noise_exactly(float64_default, cls, kw, k):
    """If eps(rho) = p(rho) z along the path, the k-point step to sigma = 0 is x_0 = x / alpha - P(rho) z with
    P' = p, P(0) = 0, exactly for deg p < k and not for deg p = k (any state may be fed: eps ignores it)."""
    s = cls(final_step_order=k, **kw)
    rho = np.array([0.9, 0.5, 0.3, 0.12])
    times = _times_at_rho(s.schedule, rho)
    z = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    states = [torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
              for i in range(len(rho))]
    alpha_0 = float(s.schedule.alpha_sigma(torch.tensor(times[-1]))[0])
    for degree, exact in [(k - 1, True), (k, False)]:
        p = np.polynomial.Polynomial(np.arange(1.0, degree + 2) * (-1) ** np.arange(degree + 1))

        def model(x, t, p=p):
            alpha, sigma = s.schedule.alpha_sigma(torch.as_tensor(t, dtype=torch.float64))
            return samplers.runtime.loop.ModelOutput(sample=float(p(sigma / alpha)) * z)

        expected = states[-1] / alpha_0 - float(p.integ()(rho[-1])) * z
        err = rel_err(_drive(s, model, states, times), expected)
        assert err < 1e-12 if exact else err > 1e-5


@pytest.mark.parametrize("cls, kw", FINAL_STEP_SOLVERS)
@pytest.mark.parametrize("k, expected", [(1, 2), (2, 4), (3, 4)])
def test_final_step_local_error_order_on_exact_gaussian(float64_default, cls, kw, k, expected):
    """Feeding the exact trajectory, the step from rho_0 to 0 errs by int_0^{rho_0} (eps - P_k) = O(rho_0^{k+1}).
    On a Gaussian eps(rho) is a constant plus an odd function of rho, so the 2-point step is already O(rho_0^4)."""
    model = samplers.testbeds.GaussianModel(shape=SHAPE, rank=4, iso_std=0.3)
    x_T = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = model.ode_solution(x_T, model.schedule.t_max, None)
    rho_0 = np.array([0.04, 0.02, 0.01])
    errs = []
    for r in rho_0:
        times = _times_at_rho(model.schedule, r * 1.3 ** np.arange(3)[::-1])
        states = [model.ode_solution(x_T, model.schedule.t_max, float(t)) for t in times]
        errs.append(rel_err(_drive(cls(final_step_order=k, **kw), model, states, times), exact))
    assert abs(np.polyfit(np.log(rho_0), np.log(errs), 1)[0] - expected) < 0.25


def test_final_step_order_round_trips_and_is_inert_without_a_jump_to_zero(tmp_path):
    model = GaussianMixtureModel(shape=SHAPE)
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    for cls in samplers.SCHEDULERS.values():
        s = cls(final_step_order=3, solver_order=3)
        s.save_pretrained(tmp_path / cls.__name__)
        loaded = cls.from_pretrained(tmp_path / cls.__name__)
        assert loaded.config.final_step_order == 3
        assert torch.equal(run(loaded, model, x, 6), run(s, model, x, 6))
        assert not torch.equal(run(loaded, model, x, 6), run(cls(final_step_order=1, solver_order=3), model, x, 6))
        sigma_min = [cls(final_sigmas_type="sigma_min", solver_order=3, final_step_order=k) for k in (1, 3)]
        assert torch.equal(*(run(s, model, x, 6) for s in sigma_min))


@pytest.mark.parametrize("value", [0, 5, 2.5, "2", True])
def test_bad_final_step_order(value):
    with pytest.raises(ValueError, match=r"final_step_order must be one of \(1, 2, 3, 4\)"):
        DPMSolverPlusPlusScheduler(final_step_order=value)


def test_final_step_order_none_is_the_solver_default():
    """None resolves per solver: DEIS multistep steps to sigma = 0 through 3 points, rhoRK and the others by DDIM;
    the resolved plan equals the explicit one."""
    assert DEISScheduler().final_step_points == 3
    assert DEISScheduler(solver_type="rhork").final_step_points == 1
    assert DPMSolverPlusPlusScheduler(final_step_order=None).final_step_points == 1
    implicit, explicit = DEISScheduler(), DEISScheduler(final_step_order=3)
    implicit.set_timesteps(6)
    explicit.set_timesteps(6)
    assert implicit._final is not None and implicit._final.points == 3
    np.testing.assert_array_equal(implicit._final.b, explicit._final.b)


@pytest.mark.parametrize(
    "cls, kw, message",
    [
        (DPMSolverPlusPlusScheduler, dict(method="singlestep"), "method='singlestep'"),
        (DPMSolverPlusPlusScheduler, dict(algorithm_type="sde-dpmsolver++"), "algorithm_type='sde-dpmsolver\\+\\+'"),
        (DPMSolverPlusPlusScheduler, dict(euler_at_final=True), "euler_at_final=True"),
        (samplers.DEISScheduler, dict(solver_type="rhork"), "solver_type='rhork'"),
    ],
)
def test_higher_order_final_step_needs_a_multistep_solver(cls, kw, message):
    with pytest.raises(ValueError, match="final_step_order > 1 needs .*" + message):
        cls(final_step_order=2, **kw)
