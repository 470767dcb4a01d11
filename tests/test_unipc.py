"""UniPC: parity with diffusers, finite bh1 final step, float64, convergence order p + 1, closed forms, bad input."""

import math

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler
from helpers import rel_err, slope

import samplers
from samplers import DPMSolverPlusPlusScheduler, UniPCScheduler
from samplers.solvers import unipc
from samplers.testbeds import GaussianMixtureModel, GaussianModel

SHAPE = (3, 8, 8)



def noise(n=4, seed=0):
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run(scheduler, model, x, steps, stop=None, exact_sigmas=False):
    """Bare pipeline loop (diffusers' UniPC.step takes no generator). ``exact_sigmas`` replaces diffusers' float32
    sigma table by float64 values of the same alphas_cumprod, isolating its algorithm from its rounding."""
    scheduler.set_timesteps(steps)
    if exact_sigmas:
        acp = scheduler.alphas_cumprod.double()
        sig = ((1 - acp) / acp).sqrt()
        end = sig[:1] if scheduler.config.final_sigmas_type == "sigma_min" else torch.zeros(1, dtype=torch.float64)
        scheduler.sigmas = torch.cat([sig[scheduler.timesteps], end])
    for i, t in enumerate(scheduler.timesteps):
        if i == stop:
            break
        x = scheduler.step(model(x, t).sample, t, x).prev_sample
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
def test_parity_with_diffusers(prediction_type, order, solver_type):
    model = GaussianMixtureModel(shape=SHAPE, prediction_type=prediction_type)
    kw = dict(solver_order=order, solver_type=solver_type, prediction_type=prediction_type)
    ref, ours = UniPCMultistepScheduler(**kw), UniPCScheduler(timestep_schedule="linspace", **kw)
    # every step but the last: diffusers' bh1 returns NaN there (B(h) = -inf times an empty residual 0)
    assert rel_err(run(ours, model, noise(), 10, stop=9), run(ref, model, noise(), 10, stop=9)) <= 1e-6
    assert torch.equal(ref.timesteps, ours.timesteps)
    x_ours, x_ref = run(ours, model, noise(), 10), run(ref, model, noise(), 10)
    assert x_ours.dtype == torch.float64 and bool(torch.isfinite(x_ours).all())
    if bool(torch.isfinite(x_ref).all()):
        assert rel_err(x_ours, x_ref) <= 1e-6
    else:
        assert solver_type == "bh1"


@pytest.mark.parametrize(
    "kw",
    [
        dict(predict_x0=False, solver_order=3),
        dict(predict_x0=False, solver_type="bh1", solver_order=2),
        dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min"),
        dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min", predict_x0=False),
        dict(solver_order=3, disable_corrector=[0, 4], beta_schedule="scaled_linear", beta_start=0.00085,
             beta_end=0.012),
    ],
)
def test_same_algorithm_as_diffusers_on_float64_sigmas(kw):
    """diffusers' float32 sigmas cost up to ~1e-4 relative in the noise-prediction form (alpha_T ~ 6e-3);
    fed float64 sigmas, its algorithm and ours agree to rounding, at every step before the sigma = 0 jump."""
    model = GaussianMixtureModel.for_scheduler_config(kw, shape=SHAPE)
    for n in (10, 17):
        ref, ours = UniPCMultistepScheduler(**kw), UniPCScheduler(timestep_schedule="linspace", **kw)
        stop = None if kw.get("final_sigmas_type") == "sigma_min" else n - 1
        x_ref = run(ref, model, noise(), n, stop=stop, exact_sigmas=True)
        assert rel_err(run(ours, model, noise(), n, stop=stop), x_ref) <= 1e-10


def test_bh1_final_step_is_finite_and_first_order():
    """Why diffusers' bh1 gives NaN: the step to sigma = 0 has h = inf, so B(h) = hh = -inf multiplies the
    (empty, = 0) first-order residual. Ours only ever uses B(h) * rho, and the last step is UniP-1 (= DDIM)."""
    assert unipc.b_of_h(-math.inf, "bh1") == -math.inf and unipc.b_of_h(-math.inf, "bh2") == -1.0
    a, b = unipc.predictor(1.0, 0.0, 0.2, 0.98, math.inf, [], "bh1")
    assert (a, b.tolist()) == (0.0, [1.0])  # x_0 = the data prediction
    s = UniPCScheduler(solver_type="bh1", solver_order=3)
    s.set_timesteps(10)
    assert s._orders()[-1] == 1
    assert all(np.isfinite(st.a) and np.all(np.isfinite(st.b)) for st in s._plan)


def test_full_float64_run(float64_default):
    """torch's default dtype float64 (diffusers' UniPC raises a linalg.solve dtype error here)."""
    model = GaussianMixtureModel(shape=SHAPE)
    x = run(UniPCScheduler(solver_type="bh1", solver_order=3), model, noise(), 10)
    assert x.dtype == torch.float64 and bool(torch.isfinite(x).all())


def test_corrector_costs_no_extra_evaluation():
    model = GaussianMixtureModel(shape=SHAPE)
    result = samplers.sample(model, UniPCScheduler(solver_order=3), noise(), 7)
    assert result.nfe == 7 and model.num_calls == 7


def test_predictor_alone_is_ddim_and_dpmsolver_2m():
    """Closed forms: UniP-1 is DDIM, UniP-2 with bh2 (rho = 1/2) is DPM-Solver++(2M) midpoint."""
    model = GaussianMixtureModel(shape=SHAPE)
    for order in (1, 2):
        unip = UniPCScheduler(solver_order=order, disable_corrector=list(range(10)))
        dpm = DPMSolverPlusPlusScheduler(solver_order=order)
        assert rel_err(run(unip, model, noise(), 10), run(dpm, model, noise(), 10)) <= 1e-12
    corrected = run(UniPCScheduler(solver_order=2), model, noise(), 10)
    assert rel_err(corrected, run(unip, model, noise(), 10)) > 1e-4  # the corrector really acts


def _exact_step(x_s, lam_s, lam_t, poly, predict_x0):
    """Exponential-integrator solution for a model output that is a polynomial in lambda (float64 quadrature):
    data form x_t = (sigma_t / sigma_s) x_s + sigma_t int e^lam x0 dlam, noise form with alpha, e^-lam, eps."""
    from scipy.integrate import quad

    alpha = lambda lam: math.sqrt(1 / (1 + math.exp(-2 * lam)))  # noqa: E731
    sigma = lambda lam: math.sqrt(1 / (1 + math.exp(2 * lam)))  # noqa: E731
    if predict_x0:
        integral = quad(lambda lam: math.exp(lam) * poly(lam - lam_s), lam_s, lam_t, epsabs=1e-15, epsrel=1e-13)[0]
        return sigma(lam_t) / sigma(lam_s) * x_s + sigma(lam_t) * integral
    integral = quad(lambda lam: math.exp(-lam) * poly(lam - lam_s), lam_s, lam_t, epsabs=1e-15, epsrel=1e-13)[0]
    return alpha(lam_t) / alpha(lam_s) * x_s - alpha(lam_t) * integral


@pytest.mark.parametrize("predict_x0", [True, False])
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
def test_solved_coefficients_integrate_polynomials_exactly(predict_x0, solver_type):
    """Where UniPC solves its order conditions (paper Thm 3.1: UniP-p for p >= 3, UniC-p for p >= 2), the update
    is exact for model outputs polynomial in lambda of degree p - 1 (UniP) or p (UniC), whatever B(h)."""
    lam_s, h, x_s = -1.2, 0.7, 0.3
    lam_t = lam_s + h
    a_s, s_s = math.sqrt(1 / (1 + math.exp(-2 * lam_s))), math.sqrt(1 / (1 + math.exp(2 * lam_s)))
    a_t, s_t = math.sqrt(1 / (1 + math.exp(-2 * lam_t))), math.sqrt(1 / (1 + math.exp(2 * lam_t)))
    rks = np.array([-0.8, -1.9])
    for fn, degree, outputs_at in ((unipc.predictor, 2, np.append(0.0, rks)),
                                   (unipc.corrector, 3, np.append(1.0, np.append(0.0, rks)))):
        coeffs = np.array([0.4, -1.1, 0.7, 0.25])[: degree + 1]
        poly = np.polynomial.Polynomial(coeffs)
        a, b = fn(a_t, s_t, a_s, s_s, h, rks, solver_type, predict_x0)
        approx = a * x_s + float(b @ poly(outputs_at * h))
        assert approx == pytest.approx(_exact_step(x_s, lam_s, lam_t, poly, predict_x0), rel=1e-12, abs=1e-13)


def test_g_series_and_recursion_agree():
    """g_k(hh) = sum_j hh^j / (j + k)! below |hh| = 1/2, the recursion g_{k+1} = g_k / hh - 1/(k+1)! above."""
    assert np.allclose(unipc.g_coefficients(-0.4999999, 3), unipc.g_coefficients(-0.5, 3), rtol=1e-6)
    hh = -0.3
    assert unipc.g_coefficients(hh, 1)[0] == pytest.approx(math.expm1(hh) / hh - 1.0, rel=1e-14)


def convergence(ns, **kw):
    model = GaussianModel(shape=SHAPE, iso_std=0.1)
    x = noise()
    exact = model.ode_solution(x, model.schedule.t_max, 0)
    errs = [float((run(UniPCScheduler(final_sigmas_type="sigma_min", **kw), model, x, n) - exact).norm()) for n in ns]
    return slope(ns, errs)


@pytest.mark.parametrize(
    "kw, ns, order",
    [
        (dict(solver_order=1, solver_type="bh1"), [32, 64], 2),
        (dict(solver_order=1), [32, 64], 2),
        (dict(solver_order=2, solver_type="bh1", lower_order_final=False), [32, 64], 3),
        (dict(solver_order=2, lower_order_final=False), [32, 64], 3),
        # UniPC-3: the order-1/2 warm-up steps sit at the noisy end, where the data-prediction form damps their
        # error by sigma_0 / sigma_T ~ 1e-2, so the slope climbs slowly (3.5 at 48-64, 3.7 at 64-96) to 3.9 here.
        (dict(solver_order=3, lower_order_final=False), [128, 256], 4),
        (dict(solver_order=3, lower_order_final=False, predict_x0=False), [64, 128], 4),
        # lower_order_final (diffusers' UniPC rule: order min(p, steps left), at any step count) ends with an
        # uncorrected UniP-1 step, a local O(h^2) error that caps the asymptotic order at 2.
        (dict(solver_order=3), [128, 256], 2),
    ],
)
def test_convergence_order_on_exact_gaussian(kw, ns, order):
    measured = convergence(ns, **kw)
    assert abs(measured - order) <= 0.3, measured


def test_diffusers_config_round_trip(tmp_path):
    s = UniPCScheduler.from_config(UniPCMultistepScheduler(solver_type="bh1", disable_corrector=[0]).config)
    assert s.config.solver_type == "bh1" and s.config.disable_corrector == [0]
    assert UniPCScheduler(solver_type="midpoint").config.solver_type == "bh2"  # diffusers' alias for shared configs
    s.save_pretrained(tmp_path)
    assert UniPCScheduler.from_pretrained(tmp_path).config.disable_corrector == [0]
    assert samplers.SCHEDULERS["unipc"] is UniPCScheduler


@pytest.mark.parametrize(
    "kw, error, message",
    [
        (dict(solver_type="bh3"), ValueError, "solver_type"),
        (dict(solver_order=4), ValueError, "solver_order"),
        (dict(predict_x0="yes"), TypeError, "predict_x0"),
        (dict(disable_corrector=[0.5]), TypeError, "disable_corrector"),
        (dict(prediction_type="flow_prediction"), ValueError, "prediction_type"),
    ],
)
def test_bad_input(kw, error, message):
    with pytest.raises(error, match=message):
        UniPCScheduler(**kw)


def test_higher_order_at_sigma_zero_is_rejected():
    with pytest.raises(ValueError, match="first order"):
        unipc.predictor(1.0, 0.0, 0.2, 0.98, math.inf, [-0.5], "bh2")
    with pytest.raises(ValueError, match="sigma = 0"):
        unipc.corrector(1.0, 0.0, 0.2, 0.98, math.inf, [], "bh2")
