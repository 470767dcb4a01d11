"""DEIS: parity with diffusers (log-rho), tAB quadrature against scipy, DDIM equivalence, convergence orders."""

import math

import numpy as np
import pytest
import torch
from diffusers import DEISMultistepScheduler, DPMSolverMultistepScheduler
from helpers import rel_err, run, slope
from numpy.polynomial import Polynomial
from scipy.integrate import quad

import samplers
from samplers import DEISScheduler, DPMSolverPlusPlusScheduler
from samplers.solvers.deis import lagrange_basis
from samplers.testbeds import GaussianMixtureModel, GaussianModel

SHAPE = (3, 8, 8)



class DiffusersDEIS(DEISMultistepScheduler):
    """diffusers' scheduler, accepting the ``generator=`` that the shared test loop passes."""

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        return super().step(model_output, timestep, sample, return_dict=return_dict)


def noise(n=4, seed=0):
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run_with_float64_sigmas(ref, model, x, steps):
    """diffusers' DEIS with its float32 sigma table replaced by float64 values (isolates the formulas)."""
    ref.set_timesteps(steps)
    acp = ref.alphas_cumprod.double()
    sigmas = ((1 - acp) / acp).sqrt()
    ref.sigmas = torch.cat([sigmas[ref.timesteps], sigmas[:1]])
    return run(ref, model, x)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_logrho_parity_with_diffusers(float64_default, prediction_type, order):
    model = GaussianMixtureModel(shape=SHAPE, prediction_type=prediction_type)
    kw = dict(solver_order=order, prediction_type=prediction_type)
    ref = DiffusersDEIS(**kw)
    ours = DEISScheduler(timestep_schedule="linspace", final_sigmas_type="sigma_min", **kw)
    x_ref, x_ours = run(ref, model, noise(), 10), run(ours, model, noise(), 10)
    assert torch.equal(ref.timesteps, ours.timesteps)
    assert x_ours.dtype == torch.float64
    assert rel_err(x_ours, x_ref) <= 1e-6
    # the remaining ~1e-7 is diffusers' float32 sigma table: with float64 sigmas the formulas agree to roundoff
    assert rel_err(x_ours, run_with_float64_sigmas(ref, model, noise(), 10)) <= 1e-12


def test_from_diffusers_configs():
    dpm = DEISScheduler.from_config(DPMSolverMultistepScheduler(solver_type="heun").config, solver_order=3)
    assert (dpm.config.algorithm_type, dpm.config.solver_type, dpm.config.solver_order) == ("deis", "logrho", 3)
    ours = DEISScheduler.from_config(DiffusersDEIS(solver_order=3).config)
    assert ours.config.solver_type == "logrho" and ours.config.solver_order == 3
    assert samplers.SCHEDULERS["deis"] is DEISScheduler


def test_save_and_load_round_trip(tmp_path):
    s = DEISScheduler(solver_type="rhork", rk_method="3kutta", timestep_schedule="time_quadratic")
    s.save_pretrained(tmp_path)
    loaded = DEISScheduler.from_pretrained(tmp_path)
    assert loaded.config.solver_type == "rhork" and loaded.config.rk_method == "3kutta"
    s.set_timesteps(6)
    loaded.set_timesteps(6)
    assert torch.equal(s.timesteps, loaded.timesteps)


def _tab_kernel(tau, j, nodes, k, log_alpha_k, rate):
    """(-d log alpha / dtau) / (alpha sigma) * l_j(tau) on the piece [k, k + 1] where log alpha is linear."""
    la = log_alpha_k + rate * (tau - k)
    ell = np.prod([(tau - n) / (nodes[j] - n) for i, n in enumerate(nodes) if i != j])
    return -rate * math.exp(-la) / math.sqrt(-math.expm1(2 * la)) * ell


def tab_reference(acp: np.ndarray, nodes: np.ndarray, t_s: float, t_t: float) -> np.ndarray:
    """tAB weights / alpha_t straight from the paper's kernel in t, by scipy quad on each linear piece of
    log alpha: int_{t_s}^{t_t} (-d log alpha / dtau) / (alpha_tau sigma_tau) l_j(tau) dtau."""
    log_alpha = 0.5 * np.log(acp)
    out = np.zeros(len(nodes))
    for k in range(math.floor(t_t), math.ceil(t_s)):
        lo, hi = max(k, t_t), min(k + 1, t_s)
        for j in range(len(nodes)):
            args = (j, nodes, k, log_alpha[k], log_alpha[k + 1] - log_alpha[k])
            out[j] -= quad(_tab_kernel, lo, hi, args=args, epsabs=0, epsrel=1e-13, limit=200)[0]
    return out


@pytest.mark.parametrize("grid", ["time_quadratic", "logsnr"])
def test_tab_coefficients_match_scipy_quad(grid):
    s = DEISScheduler(solver_type="tab", solver_order=4, timestep_schedule=grid, final_sigmas_type="sigma_min",
                      lower_order_final=False)
    s.set_timesteps(8)
    acp, t, alpha = s.schedule.alphas_cumprod.numpy(), s.grid_timesteps, s.grid_alpha
    for i, step in enumerate(s._plan):
        nodes = t[i::-1][: len(step.b)]
        ref = alpha[i + 1] * tab_reference(acp, nodes, t[i], t[i + 1])
        assert step.a == pytest.approx(alpha[i + 1] / alpha[i], rel=1e-14)
        np.testing.assert_allclose(step.b, ref, rtol=0, atol=1e-10 * max(1.0, np.abs(ref).max()))


def test_rhoab_coefficients_are_exact_polynomial_integrals():
    """rhoAB weights = alpha_t * int l_j(rho) drho, the Lagrange polynomials in rho integrated in closed form."""
    s = DEISScheduler(solver_type="rhoab", solver_order=4, final_sigmas_type="sigma_min", lower_order_final=False)
    s.set_timesteps(6)
    rho, alpha = s.grid_sigma / s.grid_alpha, s.grid_alpha
    for i, step in enumerate(s._plan):
        nodes = rho[i::-1][: len(step.b)]
        for j, b in enumerate(step.b):
            others = np.delete(nodes, j)
            antiderivative = (Polynomial(np.atleast_1d(np.poly(others))[::-1]) / np.prod(nodes[j] - others)).integ()
            exact = alpha[i + 1] * (antiderivative(rho[i + 1]) - antiderivative(rho[i]))
            assert b == pytest.approx(exact, rel=1e-11, abs=1e-13)


def test_lagrange_basis_reproduces_cubics():
    nodes = np.array([3.0, 1.0, -0.5, 2.5])
    x = np.linspace(-1, 4, 7)
    cubic = lambda v: 2 * v**3 - v + 0.25  # noqa: E731
    np.testing.assert_allclose(cubic(nodes) @ lagrange_basis(x, nodes), cubic(x), atol=1e-12)


@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
@pytest.mark.parametrize("kw", [dict(solver_type=v) for v in ("tab", "rhoab", "logrho", "ipndm")]
                         + [dict(solver_type="rhork", rk_method="1euler")])
def test_first_order_is_ddim(float64_default, kw, final_sigmas_type):
    """Every variant with one point (tAB0, rhoAB0, iPNDM's first weight, Euler in rho) is DDIM = DPM-Solver++(1)."""
    model = GaussianMixtureModel(shape=SHAPE)
    common = dict(solver_order=1, timestep_schedule="time_quadratic", final_sigmas_type=final_sigmas_type)
    ref = run(DPMSolverPlusPlusScheduler(**common), model, noise(), 7)
    assert rel_err(run(DEISScheduler(**common, **kw), model, noise(), 7), ref) <= 1e-10


def convergence(model, x, ns, **kw):
    """Measured order: slope of log error vs log NFE against the exact ODE solution."""
    exact = model.ode_solution(x, model.schedule.t_max, 0)
    nfes, errs = [], []
    for n in ns:
        s = DEISScheduler(final_sigmas_type="sigma_min", lower_order_final=False, **kw)
        errs.append(rel_err(run(s, model, x, n), exact))
        nfes.append(len(s.timesteps))
    assert min(errs) > 1e-9  # well above float64 noise
    return slope(nfes, errs)


@pytest.mark.parametrize(
    "kw, ns, order",
    [
        (dict(solver_type="tab", solver_order=1), [40, 80], 1),
        (dict(solver_type="tab", solver_order=2), [80, 160], 2),
        # tAB's Lagrange polynomials in t see the kinks of the piecewise-linear discrete schedule at integer t:
        # beyond ~400 steps that error (~2e-7) dominates, so stay below it.
        (dict(solver_type="tab", solver_order=3), [160, 320], 3),
        (dict(solver_type="rhoab", solver_order=2), [80, 160], 2),
        (dict(solver_type="rhoab", solver_order=3), [160, 320], 3),
        (dict(solver_type="rhoab", solver_order=4), [160, 320], 4),
        (dict(solver_type="logrho", solver_order=2), [80, 160], 2),
        (dict(solver_type="rhork", rk_method="2heun"), [40, 80], 2),
        (dict(solver_type="rhork", rk_method="3kutta"), [80, 160], 3),
        (dict(solver_type="rhork", solver_order=4), [20, 40], 4),
        # iPNDM's fixed weights assume equal steps in rho; on any grid that is not uniform in rho (logSNR here,
        # uniform t in the official code) the weight mismatch is O(h^2) locally, so every iPNDM order converges
        # at order 2.
        (dict(solver_type="ipndm", solver_order=2), [80, 160], 2),
        (dict(solver_type="ipndm", solver_order=3), [80, 160], 2),
        (dict(solver_type="ipndm", solver_order=4), [80, 160], 2),
    ],
)
def test_convergence_order_on_exact_gaussian(kw, ns, order):
    model = GaussianModel(shape=SHAPE, iso_std=0.1)
    measured = convergence(model, noise(), ns, **kw)
    assert abs(measured - order) <= 0.3, measured


def test_higher_order_beats_ddim_at_low_nfe():
    """Default options (lower-order final steps) at 10 NFE: tAB with 3 points has well under DDIM's error."""
    model = GaussianModel(shape=SHAPE, iso_std=0.1)
    exact = model.ode_solution(noise(), model.schedule.t_max, 0)
    err = {k: rel_err(run(DEISScheduler(solver_type="tab", solver_order=k, final_sigmas_type="sigma_min"), model,
                          noise(), 10), exact) for k in (1, 3)}
    assert err[3] < 0.6 * err[1], err


@pytest.mark.parametrize("method, c", [("2heun", [0, 1]), ("3kutta", [0, 0.5, 1]), ("4rk", [0, 0.5, 0.5, 1])])
def test_rhork_stage_evaluations(method, c):
    """Stage k of step i is evaluated at rho_i + c_k (rho_{i+1} - rho_i); a final jump to sigma = 0 is one call."""
    model = GaussianModel(shape=SHAPE, iso_std=0.1)
    s = DEISScheduler(solver_type="rhork", rk_method=method)
    out = samplers.sample(model, s, noise(), 6)
    assert out.nfe == len(s.timesteps) == len(c) * 5 + 1
    assert s.order == len(c)
    alpha, sigma = s.schedule.alpha_sigma(s.timesteps.double())
    rho_grid = s.grid_sigma / s.grid_alpha
    expected = [r0 + ck * (r1 - r0) for r0, r1 in zip(rho_grid[:5], rho_grid[1:6]) for ck in c] + [rho_grid[5]]
    np.testing.assert_allclose((sigma / alpha).numpy(), expected, rtol=1e-12)
    assert torch.isfinite(out.samples).all()


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(solver_type="rk4"), "solver_type must be one of"),
        (dict(solver_type="rhork", rk_method="5dopri"), "rk_method must be one of"),
        (dict(solver_order=5), r"solver_order must be one of \(1, 2, 3, 4\)"),
        (dict(solver_order=0, solver_type="tab"), "solver_order must be one of"),
        (dict(solver_order=4, solver_type="logrho"), "solver_order must be at most 3 for solver_type='logrho'"),
        (dict(algorithm_type="dpm"), "algorithm_type must be 'deis'"),
    ],
)
def test_bad_input(kw, message):
    with pytest.raises(ValueError, match=message):
        DEISScheduler(**kw)
