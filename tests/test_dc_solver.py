"""DC-Solver: identity at rho = 1, the compensation formula and its wiring, ratio search (held-out gain, cache),
the DPM-Solver++ plug-in, cascade polynomial regression, ground truth accuracy, bad input."""

import json
import math

import numpy as np
import pytest
import torch

import samplers
from guidance import CFG, ClassifierFreeGuidedModel
from samplers import (
    CascadePolynomialRegression,
    DCSolverScheduler,
    DPMSolverPlusPlusScheduler,
    UniPCScheduler,
    search_dc_ratios,
    with_dynamic_compensation,
)
from samplers.runtime.loop import noise_from_seeds
from samplers.solvers.dc_solver import (
    compensation_weights,
    lagrange_weights,
    reference_trajectory,
)
from samplers.solvers.prediction import to_data
from samplers.testbeds import GaussianMixtureModel, GaussianModel

SHAPE = (3, 8, 8)
DCDPMSolver = with_dynamic_compensation(DPMSolverPlusPlusScheduler)



def noise(seeds=range(4)):
    return noise_from_seeds(seeds, SHAPE, dtype=torch.float64)


def run(scheduler, model, x, steps):
    return samplers.sample(model, scheduler, x, steps).samples


def rms(a, b):
    return float((a - b).square().mean().sqrt())


@pytest.mark.parametrize(
    "dc_cls, base_cls, kw",
    [
        (DCSolverScheduler, UniPCScheduler, dict(solver_order=2)),
        (DCSolverScheduler, UniPCScheduler, dict(solver_order=3, solver_type="bh1", timestep_schedule="linspace")),
        (DCDPMSolver, DPMSolverPlusPlusScheduler, dict(solver_order=3)),
        (DCDPMSolver, DPMSolverPlusPlusScheduler, dict(solver_order=2, final_sigmas_type="sigma_min")),
    ],
)
def test_unit_ratios_reproduce_the_base_solver_bit_for_bit(dc_cls, base_cls, kw):
    model = GaussianMixtureModel(shape=SHAPE)
    base = run(base_cls(**kw), model, noise(), 8)
    assert torch.equal(run(dc_cls(dc_ratios=[1.0] * 8, **kw), model, noise(), 8), base)
    assert torch.equal(run(dc_cls(**kw), model, noise(), 8), base)  # no ratios: rho = 1
    assert not torch.equal(run(dc_cls(dc_ratios=[1, 1, 1.1, 1, 1, 1, 1, 1], **kw), model, noise(), 8), base)


def test_lagrange_compensation_is_exact_for_quadratics_in_time():
    times = [999.0, 899.0, 799.0, 699.0]
    f = lambda t: 0.3 - 2e-3 * t + 4e-6 * t**2  # noqa: E731
    for ratio in (0.5, 0.9, 1.0, 1.4):
        w = compensation_weights(times, 3, ratio)  # nodes t_3, t_2, t_1
        target = times[2] + ratio * (times[3] - times[2])
        assert sum(wj * f(tj) for wj, tj in zip(w, times[3:0:-1])) == pytest.approx(f(target), rel=1e-12)
    assert compensation_weights(times, 3, 1.0) == pytest.approx([1.0, 0.0, 0.0], abs=1e-15)
    assert compensation_weights(times, 3, 0.0) == pytest.approx([0.0, 1.0, 0.0], abs=1e-15)
    assert sum(lagrange_weights([3.0, 1.0], 2.0)) == pytest.approx(1.0)


def test_plugin_on_ddim_matches_the_formula_by_hand():
    """DDIM (DPM-Solver++ order 1) + DC: x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} expm1(-h) D_i^c with
    D_i^c = Lagrange-in-t through (D_i, D_{i-1}^c, D_{i-2}^c) at t_{i-1} + rho_i (t_i - t_{i-1}): the compensated
    outputs stay in the buffer."""
    ratios = [1.0, 1.0, 0.8, 1.3, 0.95, 1.1]
    model = GaussianMixtureModel(shape=SHAPE)
    s = DCDPMSolver(solver_order=1, dc_ratios=ratios)
    ours = run(s, model, noise(), 6)
    alpha, sigma, lam, times = s.grid_alpha, s.grid_sigma, s.grid_lambda, s.grid_timesteps
    x, buffer = noise(), []
    for i in range(6):
        d = to_data(model(x, times[i]).sample, x, alpha[i], sigma[i], "epsilon")
        if ratios[i] != 1.0:
            t = times[i - 1] + ratios[i] * (times[i] - times[i - 1])
            w = lagrange_weights(times[i - 2 : i + 1][::-1], t)
            d = w[0] * d + w[1] * buffer[-1] + w[2] * buffer[-2]
        buffer.append(d)
        x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * math.expm1(-(lam[i + 1] - lam[i])) * d
    assert rms(ours, x) <= 1e-12 * float(x.square().mean().sqrt())


def test_unipc_corrector_uses_the_raw_output_and_buffers_the_compensated_one():
    """Official order: UniC at t_i with the raw M_i, then M_i is compensated in the buffer before UniP."""
    model = GaussianMixtureModel(shape=SHAPE)
    dc, plain = DCSolverScheduler(dc_ratios=[1, 1, 0.85, 1, 1]), UniPCScheduler()
    dc.set_timesteps(5)
    plain.set_timesteps(5)
    x_dc = x_plain = noise()
    raw = []
    for i, t in enumerate(dc.timesteps[:3]):
        out = model(x_dc, t).sample
        raw.append(to_data(out, x_dc, dc.grid_alpha[i], dc.grid_sigma[i], "epsilon"))
        x_dc = dc.step(out, t, x_dc).prev_sample
        x_plain = plain.step(model(x_plain, t).sample, t, x_plain).prev_sample
    assert torch.equal(dc._last_sample, plain._last_sample)  # corrected state at t_2: no DC yet
    w = compensation_weights(dc.dc_times, 2, 0.85)
    assert torch.allclose(dc.history[0], w[0] * raw[2] + w[1] * raw[1] + w[2] * raw[0], rtol=0, atol=1e-14)
    assert not torch.equal(x_dc, x_plain)


def test_reference_trajectory_is_the_exact_ode_solution_at_every_grid_point():
    """300 DPM-Solver++(3M) steps on the refined grid: <= 1e-4 relative at every node (3.6e-5 at the end point;
    the first-order warm-up makes it converge at second order), far below a 5-step solver's ~1e-2."""
    model = GaussianModel(shape=SHAPE, iso_std=0.1)
    s = UniPCScheduler(final_sigmas_type="sigma_min", timestep_schedule="linspace")
    s.set_timesteps(5)
    states = reference_trajectory(model, s, noise(), steps=300)
    assert len(states) == 6
    for t, x in zip(s.grid_timesteps, states):
        exact = model.ode_solution(noise(), model.schedule.t_max, t)
        assert float((x - exact).norm() / exact.norm()) <= 1e-4


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """UniPC-2 at 5 NFE on a 3x8x8 mixture, on the uniform log-SNR grid (on the default ``logsnr_interior`` grid
    the base error is 1.8x lower and the searched ratios measured 1.06x worse on held-out noises: DC has nothing
    left to compensate there): ratios searched on 10 noises (cached), evaluated on 100 others."""
    model = GaussianMixtureModel(shape=SHAPE)
    cache = tmp_path_factory.mktemp("dc") / "ratios.json"
    train, test = noise(range(10)), noise(range(1000, 1100))
    kw = dict(num_iters=20, reference_steps=200, cache=cache, model_id="mixture-3x8x8")
    ratios = search_dc_ratios(model, UniPCScheduler(timestep_schedule="logsnr"), train, 5, **kw)
    return dict(model=model, cache=cache, train=train, test=test, kw=kw, ratios=ratios)


def test_searched_ratios_lower_the_error_on_other_noises(searched):
    model, test, ratios = searched["model"], searched["test"], searched["ratios"]
    assert len(ratios) == 5 and ratios[:2] == [1.0, 1.0] and all(r != 1.0 for r in ratios[2:])
    s = UniPCScheduler(timestep_schedule="logsnr")
    s.set_timesteps(5)
    truth = reference_trajectory(model, s, test, steps=200)[-1]
    base = rms(run(UniPCScheduler(timestep_schedule="logsnr"), model, test, 5), truth)
    result = samplers.sample(model, DCSolverScheduler(dc_ratios=ratios, timestep_schedule="logsnr"), test, 5)
    assert result.nfe == 5  # no extra model evaluation
    assert rms(result.samples, truth) < 0.95 * base, (rms(result.samples, truth), base)  # measured 0.89x


def test_search_cache_is_keyed_and_reused(searched):
    model = searched["model"]
    calls = model.num_calls
    again = search_dc_ratios(model, UniPCScheduler(timestep_schedule="logsnr"), searched["train"], 5,
                             **searched["kw"])
    assert again == searched["ratios"] and model.num_calls == calls
    (key,) = json.loads(searched["cache"].read_text())
    fields = json.loads(key)
    assert (fields["model"], fields["nfe"], fields["guidance_scale"], fields["solver"]) == (
        "mixture-3x8x8", 5, 1.0, "DCSolverScheduler")
    assert fields["config"]["solver_order"] == 2


@pytest.mark.parametrize("order", [2, 3])
def test_plugin_search_improves_dpmsolver_multistep(order):
    """The DC plug-in on predictor-only DPM-Solver++ 2M / 3M (6 NFE; measured 0.71x / 0.50x the error)."""
    model = GaussianMixtureModel(shape=SHAPE)
    dpm = DPMSolverPlusPlusScheduler(solver_order=order)
    ratios = search_dc_ratios(model, dpm, noise(range(10)), 6, num_iters=20, reference_steps=200)
    test = noise(range(2000, 2100))
    dpm.set_timesteps(6)
    truth = reference_trajectory(model, dpm, test, steps=200)[-1]
    base = rms(run(DPMSolverPlusPlusScheduler(solver_order=order), model, test, 6), truth)
    dc = rms(run(DCDPMSolver(solver_order=order, dc_ratios=ratios), model, test, 6), truth)
    assert dc < 0.85 * base, (dc, base)


def test_tanh_bounded_search_stays_in_range():
    """bound="tanh" (official bound_func) searches rho = 1 + tanh(p) / 2: always inside (0.5, 1.5)."""
    model = GaussianMixtureModel(shape=SHAPE)
    ratios = search_dc_ratios(model, UniPCScheduler(), noise(range(10)), 6, num_iters=10, lr=1.0,
                              reference_steps=100, bound="tanh")
    assert ratios[:2] == [1.0, 1.0] and all(0.5 < r < 1.5 and r != 1.0 for r in ratios[2:])


def _official_cpr(coeffs, cfg, nfe, step):
    """The official cascade evaluation, written independently: quadratic in N/50 -> quadratic in CFG/12 ->
    cubic in step/N."""
    c = np.asarray(coeffs).reshape(4, 3, 3)
    n, g, x = nfe / 50, cfg / 12, step / nfe
    per_cfg = c[..., 0] * n**2 + c[..., 1] * n + c[..., 2]
    per_power = per_cfg[:, 0] * g**2 + per_cfg[:, 1] * g + per_cfg[:, 2]
    return sum(per_power[k] * x**k for k in range(4))


def test_cpr_layout_matches_the_official_formula_and_round_trips(tmp_path):
    coeffs = np.random.default_rng(0).normal(size=36)
    cpr = CascadePolynomialRegression(coeffs)
    pred = cpr.predict(8, 7.5)
    assert pred[:2] == [1.0, 1.0]
    assert pred[2:] == pytest.approx([_official_cpr(coeffs, 7.5, 8, s) for s in range(3, 9)], rel=1e-12)
    cpr.save(tmp_path / "cpr.json")
    np.save(tmp_path / "official.npy", coeffs)
    for path in (tmp_path / "cpr.json", tmp_path / "official.npy"):
        assert CascadePolynomialRegression.load(path).predict(8, 7.5) == pred
    model = GaussianMixtureModel(shape=SHAPE)
    via_cpr = DCSolverScheduler(cpr_coeffs=CascadePolynomialRegression.fit({(6, 3.0): [1, 1, 1.1, 0.9, 1.05, 1.0]})
                                .to_list(), guidance_scale=3.0)
    via_cpr.set_timesteps(6)
    assert torch.equal(run(via_cpr, model, noise(), 6),
                       run(DCSolverScheduler(dc_ratios=via_cpr.dc_ratios), model, noise(), 6))


def test_cpr_fit_recovers_a_cascade_polynomial_on_a_held_out_pair():
    """Ratios generated by known coefficients on a 4 x 4 (NFE, scale) grid: the fit predicts the held-out
    interior pair exactly (the default, ridge 0, the paper's least squares), and a small ridge stays close."""
    true = CascadePolynomialRegression(np.random.default_rng(1).normal(scale=0.3, size=36))
    grid = {(n, w): true.predict(n, w) for n in (5, 7, 9, 11) for w in (1.5, 4.0, 7.5, 10.0)}
    held_out = grid.pop((7, 4.0))
    assert CascadePolynomialRegression.fit(grid).predict(7, 4.0) == pytest.approx(held_out, abs=1e-8)
    assert CascadePolynomialRegression.fit(grid, ridge=1e-3).predict(7, 4.0) == pytest.approx(held_out, abs=0.05)


def test_late_starts_wait_for_a_full_buffer_before_compensating():
    """set_begin_index(k) (img2img) and a wrapper's late start (start_at: a re-plan on the grid's tail, as
    teleportation does) both equal the same run with unit ratios in its first dc_order steps from k; the later
    ratios still act."""
    model = GaussianMixtureModel(shape=SHAPE)
    ratios, k = [1.0, 1.0, 0.7, 1.3, 0.6, 1.2, 0.9, 1.1], 3
    x = noise()

    def from_k(scheduler, begin, tail=True):
        """Run from grid point k: a pipeline loops over timesteps[k:] after set_begin_index(k); after a
        wrapper's start_at the scheduler's timesteps are the tail itself."""
        scheduler.set_timesteps(8)
        begin(scheduler)
        out = x.clone()
        for t in scheduler.timesteps[k:] if tail else scheduler.timesteps:
            out = scheduler.step(model(out, t).sample, t, out).prev_sample
        return out

    unit = ratios[:k] + [1.0, 1.0] + ratios[k + 2:]
    expected = from_k(DCSolverScheduler(dc_ratios=unit), lambda s: s.set_begin_index(k))
    got = from_k(DCSolverScheduler(dc_ratios=ratios), lambda s: s.set_begin_index(k))
    assert torch.equal(got, expected)
    late = from_k(DCSolverScheduler(dc_ratios=ratios), lambda s: samplers.accelerators.base.start_at(s, k), tail=False)
    torch.testing.assert_close(late, expected, rtol=0, atol=1e-12)
    no_dc = from_k(DCSolverScheduler(), lambda s: s.set_begin_index(k))
    assert rms(got, no_dc) > 1e-3  # ratios from k + 2 on are applied


def test_paper_preset_and_stock_img2img_pipeline():
    from diffusers import StableDiffusionImg2ImgPipeline

    from tests.pipeline_factory import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    s = DCSolverScheduler.from_preset("paper-sd", pipe.scheduler.config, dc_ratios=[1, 1, 0.9, 1.1, 1.05, 0.95, 1.1, 1])
    cfg = s.config
    assert (cfg.solver_type, cfg.solver_order, cfg.disable_corrector, cfg.timestep_schedule,
            cfg.final_sigmas_type, cfg.beta_schedule) == ("bh2", 2, [0], "linspace", "zero", "scaled_linear")
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.scheduler = s
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = img2img("a cat", image=image, strength=0.5, num_inference_steps=8, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    assert s.begin_index == 4 and s.step_index == 8 and s.dc_ratios == [1.05, 0.95, 1.1, 1]
    with pytest.raises(ValueError, match="preset must be one of"):
        DCSolverScheduler.from_preset("paper-ffhq")


def test_guided_model_is_cfg_on_the_data_prediction():
    model = GaussianMixtureModel(shape=SHAPE, num_classes=2, prediction_type="v_prediction")
    x, t, labels = noise(), 600, torch.tensor([0, 1, 0, 1])
    alpha, sigma = (float(v) for v in model.schedule.alpha_sigma(t))
    x0 = lambda out: to_data(out, x, alpha, sigma, "v_prediction")  # noqa: E731
    x0_u, x0_c = x0(model(x, t).sample), x0(model(x, t, class_labels=labels).sample)
    out = ClassifierFreeGuidedModel(model, labels, 3.0)(x, t).sample
    guided = x0(out)
    assert torch.allclose(guided, x0_u + 3.0 * (x0_c - x0_u), rtol=0, atol=1e-12)
    # the one CFG: the guider on the data predictions gives the same output in the model's parameterisation
    via_guider = CFG(3.0)([model(x, t, class_labels=labels).sample, model(x, t).sample], x, alpha, sigma,
                          "v_prediction")
    assert torch.allclose(out, via_guider, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="class labels"):
        ClassifierFreeGuidedModel(model, labels[:3], 3.0)(x, t)


def test_registry_and_config_round_trip(tmp_path):
    assert samplers.SCHEDULERS["dc-solver"] is DCSolverScheduler
    s = DCSolverScheduler(dc_ratios=[1, 1, 0.9, 1.2, 1.0], solver_type="bh1")
    s.save_pretrained(tmp_path)
    loaded = DCSolverScheduler.from_pretrained(tmp_path)
    assert loaded.config.dc_ratios == [1, 1, 0.9, 1.2, 1.0] and loaded.config.solver_type == "bh1"
    assert with_dynamic_compensation(UniPCScheduler) is DCSolverScheduler
    assert with_dynamic_compensation(DPMSolverPlusPlusScheduler) is DCDPMSolver


def test_wrong_length_ratios_are_rejected():
    s = DCSolverScheduler(dc_ratios=[1.0, 1.0, 0.9])
    with pytest.raises(ValueError, match=r"dc_ratios has 3 entries but num_inference_steps=5"):
        s.set_timesteps(5)
    s.set_timesteps(3)  # the right length is fine


@pytest.mark.parametrize(
    "kw, error, message",
    [
        (dict(dc_ratios="1,1,1"), TypeError, "dc_ratios must be a list"),
        (dict(dc_ratios=[1, 1, float("nan")]), ValueError, "finite"),
        (dict(dc_order=4), ValueError, "dc_order"),
        (dict(dc_ratios=[1, 1, 1], cpr_coeffs=[0.0] * 36), ValueError, "either dc_ratios or cpr_coeffs"),
        (dict(cpr_coeffs=[0.0] * 35), ValueError, "36 finite coefficients"),
        (dict(guidance_scale=float("inf")), ValueError, "guidance_scale"),
    ],
)
def test_bad_options(kw, error, message):
    with pytest.raises(error, match=message):
        DCSolverScheduler(**kw)


def test_bad_use():
    with pytest.raises(ValueError, match="first 2 dc_ratios must be 1"):
        DCSolverScheduler(dc_ratios=[1, 0.9, 1]).set_timesteps(3)
    with pytest.raises(TypeError, match="ExponentialIntegratorScheduler"):
        with_dynamic_compensation(torch.nn.Module)
    model = GaussianMixtureModel(shape=SHAPE)
    with pytest.raises(ValueError, match="multistep"):
        search_dc_ratios(model, DPMSolverPlusPlusScheduler(method="singlestep"), noise(), 5)
    with pytest.raises(ValueError, match="bound must be one of"):
        search_dc_ratios(model, UniPCScheduler(), noise(), 5, bound="sigmoid")
    with pytest.raises(ValueError, match="model_id"):
        search_dc_ratios(model, UniPCScheduler(), noise(), 5, cache="ratios.json")
    with pytest.raises(ValueError, match="expected 5"):
        CascadePolynomialRegression.fit({(5, 1.0): [1, 1, 1]})
