"""CFG and APG guiders: formulas, parity with diffusers' APG, step-wise momentum, the framework loop, bad input."""

from __future__ import annotations

import pytest
import torch
from diffusers import HeunDiscreteScheduler
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

import guidance
import samplers
from samplers.testbeds import GaussianMixtureModel, smooth_patterns


def predictions(seed=0, shape=(4, 3, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3)]


def test_apg_with_eta_one_no_threshold_no_momentum_is_cfg():
    cond, uncond, x = predictions()
    for w in (0.0, 1.0, 3.0, 7.5, 15.0):
        apg = guidance.APG(w, eta=1.0, norm_threshold=0.0, momentum=0.0)
        cfg = guidance.CFG(w)
        torch.testing.assert_close(apg.combine([cond, uncond], x, 0.5, 0.8), cfg.combine([cond, uncond], x, 0.5, 0.8),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_cfg_in_data_space_equals_cfg_on_the_model_output(prediction_type):
    """The x0 <-> eps / v maps are affine in the output at fixed x, so D_u + w (D_c - D_u) is the pipeline's
    formula applied to the raw outputs."""
    cond, uncond, x = predictions(1)
    out = guidance.CFG(6.0)([cond, uncond], x, 0.3, 0.95, prediction_type)
    torch.testing.assert_close(out, uncond + 6.0 * (cond - uncond), rtol=1e-12, atol=1e-12)


def test_apg_matches_diffusers_normalized_guidance_over_steps():
    """diffusers' normalized_guidance with use_original_formulation=True returns D_c + s u with Ho & Salimans'
    scale s = w - 1, i.e. the paper's D_c + (w - 1) u; ours (advanced once per step) must agree step after
    step, momentum and threshold included."""
    apg = guidance.APG(9.0, eta=0.3, norm_threshold=4.0, momentum=-0.6)
    buffer = MomentumBuffer(-0.6)
    for step in range(4):
        cond, uncond, x = predictions(step)
        if step:
            apg.advance()
        ours = apg.combine([cond, uncond], x, 0.5, 0.8)
        ref = normalized_guidance(cond, uncond, 9.0 - 1, buffer, eta=0.3, norm_threshold=4.0,
                                  use_original_formulation=True)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert apg.steps_advanced == 3


def test_apg_projection_threshold_and_orthogonality():
    cond, uncond, x = predictions(2)
    out = guidance.APG(5.0, eta=0.0, norm_threshold=0.0, momentum=0.0).combine([cond, uncond], x, 1.0, 1.0)
    update = (out - cond) / 4.0
    assert float((update * cond).sum((1, 2, 3)).abs().max()) < 1e-9  # eta = 0: no component along D_c
    torch.testing.assert_close(update + ((cond - uncond) * cond).sum((1, 2, 3), keepdim=True)
                               / cond.square().sum((1, 2, 3), keepdim=True) * cond, cond - uncond)
    capped = guidance.APG(5.0, eta=1.0, norm_threshold=2.0, momentum=0.0).combine([cond, uncond], x, 1.0, 1.0)
    norms = ((capped - cond) / 4.0).flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, 2.0))  # ||D_c - D_u|| ~ 11 > r: rescaled to r


def test_guidance_rescale_matches_conditional_std():
    cond, uncond, x = predictions(3)
    full = guidance.CFG(7.0, rescale=1.0).combine([cond, uncond], x, 1.0, 1.0)
    torch.testing.assert_close(full.std((1, 2, 3)), cond.std((1, 2, 3)))
    half = guidance.CFG(7.0, rescale=0.5).combine([cond, uncond], x, 1.0, 1.0)
    plain = guidance.CFG(7.0).combine([cond, uncond], x, 1.0, 1.0)
    torch.testing.assert_close(half, 0.5 * (full + plain))


MIXTURE = GaussianMixtureModel(shape=(3, 8, 8), num_components=4, num_classes=2, std=0.3, seed=0)
LABELS = torch.tensor([0, 1, 0, 1])


def loop_cfg_reference(model, scheduler, noise, steps, w):
    """The stock-pipeline way: CFG on the raw model outputs in a bare loop."""
    scheduler.set_timesteps(steps)
    x = noise
    for t in scheduler.timesteps:
        cond = model(x, t, class_labels=LABELS).sample
        uncond = model(x, t).sample
        x = scheduler.step(uncond + w * (cond - uncond), t, x).prev_sample
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_framework_loop_cfg_and_apg_as_cfg_match_the_stock_formula(prediction_type):
    model = GaussianMixtureModel(shape=(3, 8, 8), num_components=4, num_classes=2, std=0.3, seed=0,
                                 prediction_type=prediction_type)
    noise = samplers.noise_from_seeds(range(4), (3, 8, 8), dtype=torch.float64)
    scheduler = samplers.DPMSolverPlusPlusScheduler(prediction_type=prediction_type)
    ref = loop_cfg_reference(model, scheduler, noise, 8, 4.0)
    for guider in (guidance.CFG(4.0), guidance.APG(4.0, eta=1.0, norm_threshold=0.0, momentum=0.0)):
        result = guidance.sample(model, guider, scheduler, noise, 8, cond_kwargs={"class_labels": LABELS},
                                 uncond_kwargs={})
        torch.testing.assert_close(result.samples, ref, rtol=0, atol=1e-6)
        assert result.nfe == 16 and result.evaluations == 8


def test_momentum_advances_once_per_solver_step_and_resets_per_run():
    noise = samplers.noise_from_seeds(range(4), (3, 8, 8), dtype=torch.float64)
    scheduler = samplers.DPMSolverPlusPlusScheduler(solver_order=3)
    apg = guidance.APG(8.0, momentum=-0.5)
    first = guidance.sample(MIXTURE, apg, scheduler, noise, 7, cond_kwargs={"class_labels": LABELS},
                            uncond_kwargs={})
    assert apg.steps_advanced == 6
    second = guidance.sample(MIXTURE, apg, scheduler, noise, 7, cond_kwargs={"class_labels": LABELS},
                             uncond_kwargs={})
    assert torch.equal(first.samples, second.samples)  # the running average restarts every run
    no_momentum = guidance.sample(MIXTURE, guidance.APG(8.0, momentum=0.0), scheduler, noise, 7,
                                  cond_kwargs={"class_labels": LABELS}, uncond_kwargs={})
    assert float((no_momentum.samples - first.samples).abs().max()) > 1e-3


def test_momentum_with_a_multistage_scheduler_warns_and_advances_per_step():
    heun = HeunDiscreteScheduler()
    apg = guidance.APG(5.0, momentum=-0.5)
    with pytest.warns(UserWarning, match="advances once per solver step \\(every 2 model calls\\)"):
        guided = guidance.guided_model(MIXTURE, apg, {"class_labels": LABELS}, {}, scheduler=heun)
    heun.set_timesteps(5)
    x = samplers.noise_from_seeds(range(4), (3, 8, 8)) * heun.init_noise_sigma
    for t in heun.timesteps:  # Heun's step() takes no generator, so a bare loop as in stock pipelines
        x = heun.step(guided(heun.scale_model_input(x, t), t), t, x).prev_sample
    assert len(heun.timesteps) == 9 and apg.steps_advanced == 4  # 5 steps, 9 evaluations, 4 advances
    assert bool(torch.isfinite(x).all())


def class_metrics(model, x, labels):
    flat = x.reshape(len(x), -1).double()
    dist = torch.cdist(flat, model.means)
    accuracy = float((model.labels[dist.argmin(1)] == labels).double().mean())
    return float(flat.abs().mean()), accuracy


def test_apg_keeps_saturation_near_the_data_where_cfg_raises_it():
    """Class-conditional exact mixture (3x4x4, classes close together): at w = 7 and 15 CFG raises mean |x0|
    above the data's, APG with its defaults stays within 1% of it; both classify every sample right."""
    g = torch.Generator().manual_seed(0)
    means = smooth_patterns(1, (3, 4, 4), g, scale=0.8) + smooth_patterns(8, (3, 4, 4), g, scale=0.3)
    model = GaussianMixtureModel(shape=(3, 4, 4), means=means, num_classes=4, std=0.25)
    labels = torch.arange(4).repeat_interleave(32)
    data_sat, _ = class_metrics(model, model.sample_data(4096, g, class_labels=torch.arange(4).repeat(1024)),
                                torch.arange(4).repeat(1024))
    noise = samplers.noise_from_seeds(range(128), (3, 4, 4), dtype=torch.float64)
    for w in (7.0, 15.0):
        stats = {}
        for name, guider in (("cfg", guidance.CFG(w)), ("apg", guidance.APG(w))):
            scheduler = samplers.DPMSolverPlusPlusScheduler()
            result = guidance.sample(model, guider, scheduler, noise, 20, cond_kwargs={"class_labels": labels},
                                     uncond_kwargs={})
            stats[name] = class_metrics(model, result.samples, labels)
        assert stats["cfg"][0] > stats["apg"][0] + 0.01, stats
        assert abs(stats["apg"][0] / data_sat - 1) < 0.01, (stats, data_sat)
        assert stats["apg"][1] >= stats["cfg"][1] - 1e-9 and stats["apg"][1] > 0.97, stats


def test_momentum_decays_with_the_log_snr_step():
    """beta_h = sign(beta) |beta|^max(1, h / momentum_step): the paper's beta for steps up to momentum_step in
    log-SNR, less momentum for longer steps; momentum_step=None is the per-step rule."""
    (c1, u1, x), (c2, u2, _) = predictions(4), predictions(5)
    alpha0, sigma0 = 0.2, 0.98  # lambda0 = log(alpha / sigma)

    def second_update(apg, h):
        apg.combine([c1, u1], x, alpha0, sigma0)
        apg.advance()
        alpha = 1 / (1 + (sigma0 / alpha0) ** 2 * torch.tensor(-2 * h).exp().item()) ** 0.5
        return (apg.combine([c2, u2], x, alpha, (1 - alpha**2) ** 0.5) - c2) / 8.0

    for h, beta in [(0.1, -0.5), (0.2, -0.5), (0.6, -0.125)]:
        update = second_update(guidance.APG(9.0, eta=1.0, norm_threshold=0.0, momentum=-0.5), h)
        torch.testing.assert_close(update, (c2 - u2) + beta * (c1 - u1), rtol=1e-6, atol=1e-6)
    per_step = second_update(guidance.APG(9.0, eta=1.0, norm_threshold=0.0, momentum=-0.5, momentum_step=None), 0.6)
    torch.testing.assert_close(per_step, (c2 - u2) - 0.5 * (c1 - u1), rtol=1e-9, atol=1e-9)


def test_apg_never_over_saturates_more_than_cfg_on_coarse_grids():
    """The coarse grids where per-step momentum overshot (scripts/bench_guidance.py --part nfe): with the step-
    decayed momentum and the norm threshold matched per element to this 48-dim mixture, APG's mean |x0| exceeds
    the data's by no more than CFG's does, while the per-step rule exceeds CFG's on 8- or 10-step grids at w = 15."""
    g = torch.Generator().manual_seed(0)
    means = smooth_patterns(1, (3, 4, 4), g, scale=0.8) + smooth_patterns(8, (3, 4, 4), g, scale=0.3)
    model = GaussianMixtureModel(shape=(3, 4, 4), means=means, num_classes=4, std=0.25)
    labels = torch.arange(4).repeat_interleave(128)
    data_sat, _ = class_metrics(model, model.sample_data(512, torch.Generator().manual_seed(1), class_labels=labels),
                                labels)
    noise = samplers.noise_from_seeds(range(512), (3, 4, 4), dtype=torch.float64)
    r = 2.5 * (48 / (4 * 64 * 64)) ** 0.5

    def over(guider, steps):
        result = guidance.sample(model, guider, samplers.DPMSolverPlusPlusScheduler(), noise, steps,
                                 cond_kwargs={"class_labels": labels}, uncond_kwargs={})
        return max(0.0, class_metrics(model, result.samples, labels)[0] / data_sat - 1)

    for w in (7.5, 15.0):
        for steps in (5, 6, 8, 10, 15):
            assert over(guidance.APG(w, norm_threshold=r), steps) <= over(guidance.CFG(w), steps), (w, steps)
    per_step = guidance.APG(15.0, norm_threshold=r, momentum_step=None)
    assert max(over(per_step, steps) - over(guidance.CFG(15.0), steps) for steps in (8, 10)) > 0.1


def test_bad_input():
    for make in (guidance.CFG, guidance.APG):
        for bad in (-0.5, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="scale must be a finite number in \\[0, inf\\)"):
                make(bad)
        with pytest.raises(TypeError, match="scale must be a real number, got bool"):
            make(True)
    with pytest.raises(ValueError, match="rescale must be a finite number in \\[0, 1\\]"):
        guidance.CFG(5.0, rescale=1.5)
    for bad in (-1.0, 1.0, 2.0):
        with pytest.raises(ValueError, match="momentum must be a finite number in \\(-1, 1\\)"):
            guidance.APG(5.0, momentum=bad)
    with pytest.raises(ValueError, match="momentum_step must be a finite number in \\(0, inf\\)"):
        guidance.APG(5.0, momentum_step=0.0)
    with pytest.raises(ValueError, match="norm_threshold must be a finite number in \\[0, inf\\)"):
        guidance.APG(5.0, norm_threshold=-1.0)
    with pytest.raises(ValueError, match="eta must be a finite number"):
        guidance.APG(5.0, eta=float("nan"))
    cond, uncond, x = predictions()
    with pytest.raises(ValueError, match="CFG combines 2 predictions \\(cond, uncond\\), got 1"):
        guidance.CFG(3.0)([cond], x, 0.5, 0.8)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        guidance.CFG(3.0)([cond, uncond], x, 0.5, 0.8, "flow")
    with pytest.raises(TypeError, match="guider must be a guidance.Guider"):
        guidance.guided_model(MIXTURE, lambda d, x, a, s: d[0], {}, {}, scheduler=samplers.DPMSolverPlusPlusScheduler())
