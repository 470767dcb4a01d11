"""Feynman-Kac correctors: weight increments against finite differences of exact log densities, resampling,
the SMC loop on 2-D targets (better than the same SDE without weights), and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, HeunDiscreteScheduler

import guidance
import samplers
from guidance.fkc import (
    FKCScheduler,
    drift_data_prediction,
    effective_sample_size,
    log_weight_increment,
    resample_indices,
    score_quadratic,
)
from guidance.toy2d import Mixture2D, cell_probabilities, grid_centers, histogram, kl_divergence
from samplers.solvers.schedule import ContinuousVPSchedule

SCHEDULE = ContinuousVPSchedule()
P1 = Mixture2D([[-1.0, 0.5], [1.5, -1.0]], std=[0.5, 0.8], weights=[0.3, 0.7], schedule=SCHEDULE)
P2 = Mixture2D([[0.0, 1.0], [1.0, 1.0], [-1.0, -1.0]], std=[0.6, 0.4, 0.7], schedule=SCHEDULE)
POINTS = torch.tensor([[0.3, -0.2], [1.0, 0.7], [-0.8, 0.4]], dtype=torch.float64)


def fd_rate(models, a, x, t, h=1e-4, ht=1e-5, eta=1.0):
    """The weight rate that makes the weighted SDE with drift v = -f + c g^2 sum a_i s_i, c = (1 + eta^2) / 2, and
    noise eta g solve the PDE of q_t = prod p_i^{a_i}: G = d_tau log q + div v + v . grad log q
    - eta^2 g^2/2 (lap log q + |grad log q|^2), every derivative by central finite differences of the exact log
    densities and of the schedule."""
    def log_q(y, s):
        return sum(ai * m.log_prob(y, s) for ai, m in zip(a, models))

    def dt(fn):
        return (fn(t + ht) - fn(t - ht)) / (2 * ht)

    e = torch.eye(2, dtype=torch.float64)
    dlog_alpha = dt(lambda s: float(SCHEDULE.log_alpha(torch.tensor(s, dtype=torch.float64))))
    _, sigma = SCHEDULE.alpha_sigma(t)
    g2 = -2 * float(sigma) ** 2 * dt(lambda s: float(SCHEDULE.lambda_(s)))
    grads = [torch.stack([(m.log_prob(x + h * e[i], t) - m.log_prob(x - h * e[i], t)) / (2 * h) for i in range(2)], 1)
             for m in models]
    laps = [sum((m.log_prob(x + h * e[i], t) - 2 * m.log_prob(x, t) + m.log_prob(x - h * e[i], t)) / h**2
                for i in range(2)) for m in models]
    grad_q = sum(ai * g for ai, g in zip(a, grads))
    lap_q = sum(ai * lap for ai, lap in zip(a, laps))
    c = (1 + eta**2) / 2
    v = -dlog_alpha * x + c * g2 * grad_q
    div_v = -2 * dlog_alpha + c * g2 * lap_q
    d_tau = -dt(lambda s: log_q(x, s))
    return d_tau + div_v + (v * grad_q).sum(1) - 0.5 * eta**2 * g2 * (lap_q + grad_q.square().sum(1))


def step_rate(models, a, x, t, dt=1e-6, rule="euler"):
    """Our one-step log-weight increment over [t, t - dt], divided by dt."""
    alpha, sigma = (float(v) for v in SCHEDULE.alpha_sigma(t))
    alpha2, sigma2 = (float(v) for v in SCHEDULE.alpha_sigma(t - dt))
    x0 = [m.denoise(x, torch.tensor(alpha), torch.tensor(sigma)) for m in models]
    q = score_quadratic(x0, x / alpha, a)
    return log_weight_increment(q, a, 2, alpha, sigma, alpha2, sigma2, rule) / dt


@pytest.mark.parametrize("t", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("case", ["anneal2", "anneal3", "product", "cfg4"])
def test_weight_increment_matches_feynman_kac_pde_by_finite_differences(case, t):
    """Both weight rules have the rate of the PDE, for the reverse SDE and for the tempered-noise SDE
    (eta = 1 / sqrt(S), drift (S + 1) / 2 g^2 s_q): the rate does not depend on eta."""
    models, a = {"anneal2": ([P1], (2.0,)), "anneal3": ([P2], (3.0,)), "product": ([P1, P2], (1.0, 1.0)),
                 "cfg4": ([P1, P2], (4.0, -3.0))}[case]
    for rule in ("frozen", "euler"):
        for eta in (1.0, 1 / math.sqrt(sum(a))):
            torch.testing.assert_close(step_rate(models, a, POINTS, t, rule=rule),
                                       fd_rate(models, a, POINTS, t, eta=eta), rtol=2e-5, atol=3e-4)


def test_closed_forms_of_the_three_cases():
    """Docstring cases: anneal 1/2 g^2 b(b-1)|s|^2, product g^2 <s1,s2>, CFG 1/2 g^2 w(w-1)|s_c - s_u|^2 (x0)."""
    g = torch.Generator().manual_seed(0)
    d1, d2, x = (torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    alpha = 0.6
    e1, e2 = d1 - x / alpha, d2 - x / alpha
    flat = lambda v: v.flatten(1)  # noqa: E731
    torch.testing.assert_close(score_quadratic([d1], x / alpha, (2.5,)), 2.5 * 1.5 * flat(e1).square().sum(1))
    torch.testing.assert_close(score_quadratic([d1, d2], x / alpha, (1.0, 1.0)), 2 * (flat(e1) * flat(e2)).sum(1))
    torch.testing.assert_close(score_quadratic([d1, d2], x / alpha, (7.0, -6.0)),
                               42.0 * flat(d1 - d2).square().sum(1))
    a = (0.7, 1.9, 0.4)
    d3 = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    es = [d - x / alpha for d in (d1, d2, d3)]
    naive = flat(sum(ai * e for ai, e in zip(a, es))).square().sum(1) - sum(ai * flat(e).square().sum(1)
                                                                           for ai, e in zip(a, es))
    torch.testing.assert_close(score_quadratic([d1, d2, d3], x / alpha, a), naive)


def test_drift_prediction_has_the_combined_score():
    g = torch.Generator().manual_seed(1)
    d1, d2, x = (torch.randn(4, 2, generator=g, dtype=torch.float64) for _ in range(3))
    alpha, sigma = 0.3, math.sqrt(1 - 0.09)
    for a in [(2.0,), (1.0, 1.0), (5.0, -4.0)]:
        d = drift_data_prediction([d1, d2][: len(a)], x / alpha, a)
        combined = sum(ai * (alpha * di - x) / sigma**2 for ai, di in zip(a, [d1, d2]))
        torch.testing.assert_close((alpha * d - x) / sigma**2, combined)


def test_systematic_resampling_counts_are_floor_or_ceil_of_k_times_weight():
    g = torch.Generator().manual_seed(0)
    w = torch.softmax(torch.randn(50, 8, generator=g, dtype=torch.float64) * 2, -1)
    for scheme in ("systematic", "stratified", "multinomial"):
        idx = resample_indices(w, scheme, g)
        assert idx.shape == (50, 8) and idx.min() >= 0 and idx.max() <= 7
    counts = torch.zeros(50, 8, dtype=torch.float64).scatter_add_(
        1, resample_indices(w, "systematic", g), torch.ones(50, 8, dtype=torch.float64))
    assert bool(((counts >= torch.floor(8 * w) - 1e-9) & (counts <= torch.ceil(8 * w) + 1e-9)).all())
    many = torch.stack([torch.zeros(8, dtype=torch.float64).scatter_add_(0, resample_indices(
        w[:1], scheme, g)[0], torch.ones(8, dtype=torch.float64)) for scheme in ["stratified"] * 2000]).mean(0)
    torch.testing.assert_close(many, 8 * w[0], atol=0.1, rtol=0)


def test_effective_sample_size():
    log_w = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, -1e9, -1e9, -1e9], [math.log(3), 0.0, 0.0, 0.0]],
                         dtype=torch.float64)
    torch.testing.assert_close(effective_sample_size(log_w), torch.tensor([4.0, 1.0, 36 / 12], dtype=torch.float64))


def test_fkc_scheduler_steps():
    """Exponential with S = 1, eta = 1 is SDE-DPM-Solver++(1); with S = 2 it is the exact solution of the
    linear part (checked against a fine Heun solve of the noise-free drift with B frozen); the
    Euler-Maruyama step is x + (beta x / 2 + c beta s_q) dt + eta sqrt(beta dt) z."""
    fkc_exp = FKCScheduler(integrator="exponential", timestep_schedule="logsnr")
    dpm = samplers.DPMSolverPlusPlusScheduler(algorithm_type="sde-dpmsolver++", solver_order=1,
                                             timestep_schedule="logsnr")
    fkc_exp.set_timesteps(7)
    dpm.set_timesteps(7)
    for mine, theirs in zip(fkc_exp._plan, dpm._plan):
        torch.testing.assert_close(torch.tensor(mine), torch.tensor([theirs.a, theirs.b[0], theirs.noise]))
    # S = 2, eta = 0 (c = 1/2, k = 1): dx/dlambda = (dlog alpha/dlambda) x + (alpha B - 2 x), B frozen
    two = FKCScheduler(integrator="exponential", exponent_sum=2.0, noise_scale=0.0, timestep_schedule="logsnr")
    two.set_timesteps(3)
    a0, a1 = two.grid_alpha[0], two.grid_alpha[1]
    lam = torch.linspace(float(two.grid_lambda[0]), float(two.grid_lambda[1]), 20001, dtype=torch.float64)
    big_b, x = 0.7, 1.3
    sig2 = torch.sigmoid(-2 * lam)  # sigma^2 = d log alpha / d lambda on a VP schedule
    dl = float(lam[1] - lam[0])
    for s2, la in zip(sig2[:-1], lam[:-1]):  # Heun on the ODE
        alpha = float(torch.sigmoid(2 * la).sqrt())
        k1 = float(s2) * x + (alpha * big_b - 2 * x)
        xp = x + dl * k1
        s2n, an = float(torch.sigmoid(-2 * (la + dl))), float(torch.sigmoid(2 * (la + dl)).sqrt())
        x = x + dl / 2 * (k1 + s2n * xp + (an * big_b - 2 * xp))
    a, b, noise = two._plan[0]
    d = big_b + (1 - 2.0) * 1.3 / a0  # the drift's data prediction FKC hands over
    assert noise == 0.0 and abs(a * 1.3 + b * d - x) < 1e-8 and a1 > a0
    em = FKCScheduler(noise_scale=0.5)
    em.set_timesteps(10)
    t0, t1 = em.grid_timesteps[:2]
    beta = em._beta(t0)
    alpha, sigma = em.grid_alpha[0], em.grid_sigma[0]
    c, dt = (1 + 0.25) / 2, t0 - t1
    x0, d0 = torch.tensor([[0.4, -1.0]], dtype=torch.float64), torch.tensor([[0.1, 0.2]], dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    out = em.step(d0, em.timesteps[0], x0, generator=g).prev_sample  # epsilon prediction d0
    s_q = -d0 / sigma
    z = torch.randn(1, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float32).double()
    torch.testing.assert_close(out, x0 + (beta * x0 / 2 + c * beta * s_q) * dt + 0.5 * math.sqrt(beta * dt) * z)
    assert abs(beta - 0.02) < 4e-4  # g^2 = -2 d log alpha / dt ~ the last training beta, 0.02 (per timestep)


def run_fkc(guider, model=None, experts=None, populations=3, steps=6, order=1, seed=0, scheduler=None):
    if scheduler is None:
        scheduler = samplers.DPMSolverPlusPlusScheduler(algorithm_type="sde-dpmsolver++", solver_order=order)
    noise = torch.randn(populations * guider.num_particles, 2, generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64)
    return guidance.sample(model, guider, scheduler, noise, steps, experts=experts,
                           generator=torch.Generator().manual_seed(seed + 1))


def test_resampling_schedule_weights_reset_and_last_step():
    f = guidance.FKC(num_particles=6, mode="anneal", beta=3.0, ess_threshold=0.9, seed=0)
    result = run_fkc(f, model=Mixture2D([[-2.0, 0.0], [2.0, 0.0]], std=0.4, weights=[0.8, 0.2]), steps=8)
    h = result.history
    assert h["log_weights"].shape == (8, 3, 6) and h["ess"].shape == (8, 3) and h["resampled"].shape == (8, 3)
    assert h["resampled"][:-1].any() and not h["resampled"][-1].any()  # never at the last step
    ess = effective_sample_size(h["log_weights"])
    torch.testing.assert_close(h["ess"], ess)
    assert bool((h["resampled"][:-1] == (ess[:-1] <= 0.9 * 6 * (1 + 1e-12))).all())
    torch.testing.assert_close(h["log_weights"][-1], h["log_weights"][-2] * (~h["resampled"][-2, :, None]))
    assert result.chosen.shape == (3, 2)
    assert bool(((f.chosen // 6) == torch.arange(3)).all())  # one particle from each population
    assert result.nfe == result.evaluations == 8


def test_cfg_with_scale_one_is_the_plain_sde_sampler():
    """w = 1 has zero increments: systematic resampling of equal weights keeps every particle in place."""
    m = guidance.toy2d.Mixture2D([[-2.0, 1.0], [2.0, 0.0]], std=0.5, num_classes=2)
    f = guidance.FKC(1.0, num_particles=4, seed=0)
    guided = run_fkc(f, model=None, experts=[(m, {"class_labels": torch.zeros(8, dtype=torch.long)}), (m, {})],
                     populations=2, order=2)
    assert bool((guided.history["log_weights"] == 0).all()) and guided.history["resampled"][:-1].all()
    scheduler = samplers.DPMSolverPlusPlusScheduler(algorithm_type="sde-dpmsolver++", solver_order=2)
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plain = samplers.sample(m, scheduler, noise, 6, generator=torch.Generator().manual_seed(1),
                            model_kwargs={"class_labels": torch.zeros(8, dtype=torch.long)})
    torch.testing.assert_close(guided.samples, plain.samples, rtol=1e-12, atol=1e-12)


def test_resampling_moves_the_schedulers_per_particle_history():
    scheduler = samplers.DPMSolverPlusPlusScheduler(algorithm_type="sde-dpmsolver++", solver_order=2)
    scheduler.set_timesteps(5)
    x = torch.randn(4, 2, dtype=torch.float64)
    out = scheduler.step(torch.randn(4, 2, dtype=torch.float64), scheduler.timesteps[0], x,
                         generator=torch.Generator().manual_seed(0)).prev_sample
    before = scheduler.history[0].clone()
    index = torch.tensor([2, 2, 0, 3])
    moved = guidance.base.permute_state(scheduler, out, index)
    torch.testing.assert_close(moved, out[index])
    torch.testing.assert_close(scheduler.history[0], before[index])
    assert moved is scheduler._returned  # the scheduler still recognises its own state


TARGET = Mixture2D([[-2, -2], [2, 2], [-2, 2], [2, -2], [0, 0]], std=[0.6, 0.4, 0.5, 0.3, 0.45],
                   weights=[0.4, 0.25, 0.15, 0.12, 0.08])
RING = Mixture2D([[2.5 * math.cos(k * math.pi / 3), 2.5 * math.sin(k * math.pi / 3)] for k in range(6)], std=0.7,
                 weights=[0.3, 0.1, 0.2, 0.1, 0.2, 0.1])
BLOBS = Mixture2D([[-1.5, 1.0], [1.5, -1.0], [1.0, 2.0]], std=[1.0, 0.9, 0.8], weights=[0.5, 0.3, 0.2])


@pytest.mark.parametrize("case", ["anneal", "product"])
def test_fkc_beats_the_same_sde_without_weights_on_2d_targets(case):
    """400 populations x 8 particles, 40 Euler-Maruyama steps of `FKC.scheduler` (NFE 40 per particle for
    annealing, 80 for the product): KL on a 20 x 20 grid is clearly lower with weights and resampling
    (scripts/bench_fkc.py compares with a paper-style sampler at 1000 x 8)."""
    limit, bins = 4.5, 20
    grid = grid_centers(limit, bins)
    if case == "anneal":
        target = cell_probabilities(2.0 * TARGET.log_prob(grid))
        kwargs = {"model": TARGET}
    else:
        target = cell_probabilities(RING.log_prob(grid) + BLOBS.log_prob(grid))
        kwargs = {"experts": [(RING, {}), (BLOBS, {})]}
    kls = {}
    for resample in ("systematic", None):
        f = guidance.FKC(num_particles=8, mode="anneal" if case == "anneal" else "product", beta=2.0
                         if case == "anneal" else 1.0, resample=resample, seed=0)
        result = run_fkc(f, populations=400, steps=40, scheduler=f.scheduler(num_inputs=1 if case == "anneal"
                                                                               else 2), **kwargs)
        kls[resample] = kl_divergence(histogram(result.samples, limit, bins), target)
    assert kls["systematic"] < 0.6 * kls[None] and kls["systematic"] < 0.08, kls


def test_clamp_start_window_and_scheduler_checks():
    """Increments are mean-subtracted and clamped per population; nothing is weighted or resampled before
    ``start_resampling_step``; an FKCScheduler built for another exponent sum is refused."""
    model = Mixture2D([[-2.0, 0.0], [2.0, 0.0]], std=0.4, weights=[0.8, 0.2])
    f = guidance.FKC(num_particles=6, mode="anneal", beta=3.0, clamp=0.5, start_resampling_step=3, seed=0)
    h = run_fkc(f, model=model, steps=8, scheduler=f.scheduler(num_inputs=1)).history
    assert bool((h["log_weights"][:3] == 0).all()) and not h["resampled"][:3].any()
    assert h["resampled"][3:-1].all()  # resampled every step from then on (ess_threshold 1)
    w = h["log_weights"][3:-1]
    assert bool(w.abs().le(0.5 + 1e-12).all()) and float(w.abs().max()) > 0.25  # reset to 0 after each resampling
    free = guidance.FKC(num_particles=6, mode="anneal", beta=3.0, start_resampling_step=3, seed=0)
    wide = run_fkc(free, model=model, steps=8, scheduler=free.scheduler(num_inputs=1)).history["log_weights"]
    assert float((wide[3:-1] - wide[3:-1].mean(-1, keepdim=True)).abs().max()) > 0.5  # the clamp did bite
    tempered = f.scheduler(num_inputs=1, tempered_noise=True)
    assert tempered.config.exponent_sum == 3.0 and abs(tempered.config.noise_scale - 3 ** -0.5) < 1e-15
    other = samplers.DPMSolverPlusPlusScheduler(solver_order=3, beta_schedule="scaled_linear",
                                                prediction_type="v_prediction").config
    cfg = f.scheduler(other, num_inputs=1).config  # the schedule, not the solver options
    assert (cfg.solver_order, cfg.timestep_schedule, cfg.beta_schedule, cfg.prediction_type) == (
        1, "linspace", "scaled_linear", "v_prediction")
    with pytest.raises(ValueError, match="built for exponent_sum=1 but this FKC target has exponents summing to 3"):
        run_fkc(guidance.FKC(num_particles=2, mode="anneal", beta=3.0), model=model, scheduler=FKCScheduler())
    with pytest.raises(ValueError, match="integrator must be one of"):
        FKCScheduler(integrator="heun")
    with pytest.raises(ValueError, match="weight_rule must be one of"):
        guidance.FKC(weight_rule="trapezoid")
    with pytest.raises(ValueError, match="start_resampling_step must be an integer >= 0"):
        guidance.FKC(start_resampling_step=-1)
    with pytest.raises(ValueError, match="clamp must be a finite number in \\(0, inf\\)"):
        guidance.FKC(clamp=0.0)


def test_heun_weights_and_resamples_once_per_whole_step():
    """The official EDM2 code runs FKC with Heun: diffusers' Heun (2 evaluations per step, 2N - 1 in all) gets one
    weight increment per step, from the step's first stage (the left point), and resamples after its second."""
    model = Mixture2D([[-2.0, 0.0], [2.0, 0.0]], std=0.4, weights=[0.8, 0.2])
    f = guidance.FKC(num_particles=4, mode="anneal", beta=2.0, seed=0, clamp=2.0)
    result = run_fkc(f, model=model, steps=6, scheduler=HeunDiscreteScheduler())
    h = result.history
    assert result.evaluations == 11 and h["log_weights"].shape == (6, 3, 4)
    assert h["resampled"][:-1].all() and not h["resampled"][-1].any()
    assert bool((h["log_weights"][:-1].abs() <= 2.0 + 1e-12).all()) and float(h["log_weights"].abs().max()) > 0
    sde = guidance.FKC(num_particles=4, mode="anneal", beta=2.0, seed=0)
    first = run_fkc(sde, model=model, steps=1, scheduler=HeunDiscreteScheduler())
    assert first.history["log_weights"].shape == (1, 3, 4)  # one step: its evaluation is also the last


def test_bad_input():
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be a finite number in \\[0, inf\\)"):
            guidance.FKC(bad)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_particles must be an integer >= 1"):
            guidance.FKC(2.0, num_particles=bad)
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="ess_threshold must be a finite number in \\(0, 1\\]"):
            guidance.FKC(2.0, ess_threshold=bad)
    with pytest.raises(ValueError, match="beta must be a finite number in \\(0, inf\\)"):
        guidance.FKC(mode="anneal", beta=0.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        guidance.FKC(2.0, mode="sum")
    with pytest.raises(ValueError, match="resample must be one of"):
        guidance.FKC(2.0, resample="residual")
    with pytest.raises(ValueError, match="needs a batch of populations x particles, got batch size 6"):
        guidance.sample(TARGET, guidance.FKC(2.0, num_particles=4), samplers.DPMSolverPlusPlusScheduler(),
                        torch.randn(6, 2, dtype=torch.float64), 4, cond_kwargs={}, uncond_kwargs={})
    with pytest.raises(ValueError, match="mode='product' combines at least 2 experts"):
        run_fkc(guidance.FKC(num_particles=2, mode="product"), model=TARGET)
    with pytest.raises(ValueError, match="scale=3.0 needs an unconditional prediction"):
        run_fkc(guidance.FKC(3.0, num_particles=2, mode="anneal", beta=2.0), model=TARGET)
    two_stage = type("TwoStageDDPM", (DDPMScheduler,), {"order": 2})()
    with pytest.raises(ValueError, match="needs a single-stage scheduler or one that reports state_in_first_order "
                                         "\\(diffusers' Heun\\); TwoStageDDPM has order=2"):
        guidance.guided_model(TARGET, guidance.FKC(2.0), {}, {}, scheduler=two_stage)


def test_missing_step_end_is_reported():
    scheduler = samplers.DPMSolverPlusPlusScheduler(algorithm_type="sde-dpmsolver++")
    guided = guidance.guided_model(TARGET, guidance.FKC(2.0, num_particles=2), {}, {}, scheduler=scheduler)
    with pytest.raises(RuntimeError, match="pass callback=guided.step_end"):
        samplers.sample(guided, scheduler, torch.randn(4, 2, dtype=torch.float64), 4)


def test_the_old_hook_name_end_step_still_works_with_a_warning():
    """The guider hook after each solver step is `step_end`; a guider written against the old name `end_step`
    warns when defined and is still called, and calling `end_step` warns and runs `step_end`."""
    with pytest.warns(DeprecationWarning, match="now called step_end"):
        class OldName(guidance.FKC):
            calls = 0

            def end_step(self, alpha_next, sigma_next, last):
                type(self).calls += 1
                return guidance.FKC.step_end(self, alpha_next, sigma_next, last)

    model = Mixture2D([[-2.0, 0.0], [2.0, 0.0]], std=0.4, weights=[0.8, 0.2])
    new = run_fkc(guidance.FKC(num_particles=4, mode="anneal", beta=2.0, seed=0), model=model, steps=5)
    old = run_fkc(OldName(num_particles=4, mode="anneal", beta=2.0, seed=0), model=model, steps=5)
    assert OldName.calls == 5
    torch.testing.assert_close(old.samples, new.samples, rtol=0, atol=0)
    assert "OldName" not in str(guidance.GUIDERS)
    with pytest.warns(DeprecationWarning, match="now called step_end"):
        assert guidance.FKC(num_particles=2).end_step(1.0, 0.0, True) is None  # nothing pending: no step yet
