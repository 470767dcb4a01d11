"""Gaussian teleportation: exactness on the Gaussian testbed, GaussianStats, NFE accounting, auto skip, bad input."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from pipeline_factory import tiny_unet

import samplers
from samplers import DPMSolverPlusPlusScheduler, DualFast, GaussianStats, GaussianTeleport, TimeShift
from samplers.testbeds import GaussianMixtureModel, GaussianModel

SHAPE = (3, 8, 8)



@pytest.fixture(scope="module")
def gaussian():
    return GaussianModel(shape=SHAPE, rank=5, seed=3)


@pytest.fixture(scope="module")
def own_stats(gaussian):
    """The Gaussian testbed's exact mean and covariance U diag(l) U^T + s^2 I, as top-r + residual."""
    return GaussianStats(gaussian.mu.reshape(SHAPE), gaussian.U, gaussian.l + gaussian.iso_var, gaussian.iso_var)


@pytest.fixture(scope="module")
def noise():
    return samplers.noise_from_seeds(range(4), SHAPE, dtype=torch.float64)


def full_covariance(g):
    return g.U @ torch.diag(g.l) @ g.U.T + g.iso_var * torch.eye(g.mu.numel(), dtype=torch.float64)


SCHEDULERS = {
    "ours": lambda: DPMSolverPlusPlusScheduler(),
    "ddim": lambda: DDIMScheduler(),
    "dpmsolver": lambda: DPMSolverMultistepScheduler(),
    "euler": lambda: EulerDiscreteScheduler(timestep_spacing="leading"),
}


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("rank", ["top-r", "full"])
def test_teleported_state_is_the_exact_ode_solution_on_the_gaussian_testbed(name, rank, gaussian, own_stats, noise):
    stats = own_stats if rank == "top-r" else GaussianStats.from_covariance(gaussian.mu.reshape(SHAPE),
                                                                            full_covariance(gaussian))
    tele = GaussianTeleport(SCHEDULERS[name](), stats, skip=0.3)
    tele.set_timesteps(10)
    assert tele.skip_index == 3 and len(tele.timesteps) == 7
    first = tele.timesteps[0]
    model_input = tele.scale_model_input(noise * tele.init_noise_sigma, first)
    exact = gaussian.ode_solution(noise, float(tele.full_timesteps[0]), tele.skip_timestep)
    tol = 1e-7 if name == "euler" else 1e-8  # Euler stores its sigmas in float32
    torch.testing.assert_close(model_input, exact, rtol=0, atol=tol)


def test_gaussian_stats_denoiser_and_flow_match_the_testbed(gaussian, own_stats, noise):
    for t in (999, 600, 200, 10):
        alpha, sigma = (float(v) for v in gaussian.schedule.alpha_sigma(t))
        x = alpha * gaussian.sample_data(4, torch.Generator().manual_seed(t)) + sigma * noise
        a, s = (torch.tensor(v, dtype=torch.float64).reshape(1, 1, 1, 1) for v in (alpha, sigma))
        torch.testing.assert_close(own_stats.denoise(x, alpha, sigma), gaussian.denoise(x, a, s), rtol=0, atol=1e-12)
        to_data = own_stats.flow(x, (alpha, sigma), (1.0, 0.0))
        torch.testing.assert_close(to_data, gaussian.ode_solution(x, t, None), rtol=0, atol=1e-12)


def test_teleport_then_solver_on_fewer_evaluations(gaussian, own_stats, noise):
    target = gaussian.ode_solution(noise, 999.0, None)
    plain = samplers.sample(gaussian, DPMSolverPlusPlusScheduler(), noise, 5)
    tele = samplers.sample(gaussian, GaussianTeleport(DPMSolverPlusPlusScheduler(), own_stats, skip=0.5), noise, 10)
    assert plain.nfe == tele.nfe == 5
    err_plain, err_tele = (float((r.samples - target).square().mean().sqrt()) for r in (plain, tele))
    assert err_tele < 0.5 * err_plain
    # the solver after the jump uses the tail of the full grid with its usual warm-up
    assert tele.timesteps == _full_grid(10)[5:]


def _full_grid(n):
    s = DPMSolverPlusPlusScheduler()
    s.set_timesteps(n)
    return s.timesteps.tolist()


def test_skip_zero_is_the_identity(own_stats, noise, gaussian):
    for make in (DPMSolverPlusPlusScheduler, DDIMScheduler, DPMSolverMultistepScheduler):
        base = samplers.sample(gaussian, make(), noise, 6)
        tele = samplers.sample(gaussian, GaussianTeleport(make(), own_stats, skip=0.0), noise, 6)
        assert torch.equal(base.samples, tele.samples) and tele.nfe == 6


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def test_ddpm_pipeline_costs_one_extra_evaluation_and_gives_the_same_samples(unet, own_stats):
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    tele = GaussianTeleport(DPMSolverMultistepScheduler(), own_stats, skip=0.3)
    pipe.scheduler = tele
    calls = []
    handle = unet.register_forward_pre_hook(lambda m, args: calls.append(int(args[1])))
    image = pipe(batch_size=2, num_inference_steps=10, output_type="pt", generator=torch.Generator().manual_seed(0))
    handle.remove()
    assert tele.extra_nfe == 1 and len(calls) == 10 - 3 + 1
    assert calls[0] == calls[1] == int(tele.skip_timestep)
    x_start = randn_tensor((2, *SHAPE), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loop = samplers.sample(unet, GaussianTeleport(DPMSolverMultistepScheduler(), own_stats, skip=0.3), x_start, 10)
    assert loop.nfe == 7
    torch.testing.assert_close(image.images, (loop.samples / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-6)


def test_teleport_composes_with_the_other_wrappers(gaussian, own_stats, noise):
    composed = TimeShift(DualFast(GaussianTeleport(DDIMScheduler(), own_stats, skip=0.5), scale=0.0), window=0)
    alone = GaussianTeleport(DDIMScheduler(), own_stats, skip=0.5)
    a, b = (samplers.sample(gaussian, s, noise, 8) for s in (composed, alone))
    assert torch.equal(a.samples, b.samples) and a.nfe == b.nfe == 4


def test_auto_skip_on_the_gaussian_testbed_jumps_as_far_as_allowed(gaussian, own_stats):
    # the probes run in the model's dtype (float32 here): the denoisers agree to float32 round-off
    tele = GaussianTeleport(DPMSolverPlusPlusScheduler(), own_stats, skip="auto", probe_model=gaussian, tol=1e-4)
    calls = gaussian.num_calls
    tele.set_timesteps(8)
    report = tele.calibrations[8]
    assert report["skip_index"] == tele.skip_index == 7 and len(tele.timesteps) == 1
    assert report["extra_nfe"] == 7 == gaussian.num_calls - calls and max(report["errors"]) < 1e-4
    tele.set_timesteps(8)  # cached: no further model calls
    assert gaussian.num_calls - calls == 7


def test_auto_skip_on_a_mixture_stops_where_the_denoisers_disagree():
    mixture = GaussianMixtureModel(shape=SHAPE, num_components=4, std=0.15, seed=1)
    stats = GaussianStats.from_samples(mixture.sample_data(2000, torch.Generator().manual_seed(0)))
    tele = GaussianTeleport(DPMSolverPlusPlusScheduler(), stats, skip="auto", tol=0.02)
    report = tele.calibrate(mixture, 12)
    errors, k = report["errors"], report["skip_index"]
    assert 1 <= k < 11 and report["extra_nfe"] == len(errors) == k + 1
    assert max(errors[:k]) <= 0.02 < errors[k]
    gap = report["disagreement"]  # noise units; the excess over the noisiest probe is what is thresholded
    assert errors[k] == pytest.approx((gap[k] ** 2 - gap[0] ** 2) ** 0.5)
    tele.set_timesteps(12)
    assert tele.skip_index == k and tele.skip_timestep == report["skip_timestep"]
    assert samplers.sample(mixture, tele, torch.randn(2, *SHAPE), 12).nfe == 12 - k


def test_gaussian_stats_from_samples_full_and_top_rank(gaussian):
    data = gaussian.sample_data(500, torch.Generator().manual_seed(0))
    flat = data.reshape(500, -1)
    full = GaussianStats.from_samples(data)
    cov = full.eigvecs @ torch.diag(full.eigvals) @ full.eigvecs.T
    torch.testing.assert_close(cov, torch.cov(flat.T), rtol=0, atol=1e-12)
    torch.testing.assert_close(full.mean.reshape(-1), flat.mean(0), rtol=0, atol=1e-14)
    top = GaussianStats.from_samples(data, rank=5)
    assert top.rank == 5 and top.shape == SHAPE
    torch.testing.assert_close(top.eigvals, full.eigvals[:5], rtol=1e-10, atol=0)
    dim = flat.shape[1]
    assert top.residual_var * (dim - 5) == pytest.approx(float(full.eigvals[5:].sum()), rel=1e-10)
    assert top.pixel_std == pytest.approx(full.pixel_std, rel=1e-12)
    # the residual variance recovers the testbed's isotropic part
    assert top.residual_var == pytest.approx(gaussian.iso_var, rel=0.1)


def test_gaussian_stats_save_load_and_folders(tmp_path, own_stats):
    own_stats.save(tmp_path / "stats.npz")
    loaded = GaussianStats.load(tmp_path / "stats.npz")
    for name in ("mean", "eigvecs", "eigvals"):
        assert torch.equal(getattr(loaded, name), getattr(own_stats, name))
    assert loaded.residual_var == own_stats.residual_var
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match=r"bad.npz is not a GaussianStats file: it lacks \['eigvecs', 'eigvals'"):
        GaussianStats.load(tmp_path / "bad.npz")

    images = tmp_path / "images"
    images.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(images / f"{i}.png")
    stats = GaussianStats.from_folder(images, rank=4)
    expected = torch.from_numpy(pixels.astype(np.float64) / 127.5 - 1).permute(0, 3, 1, 2)
    torch.testing.assert_close(stats.mean, expected.mean(0), rtol=0, atol=1e-12)
    Image.fromarray(pixels[0][:4]).save(images / "odd.png")
    with pytest.raises(ValueError, match=r"odd.png has sample shape \(3, 4, 8\), earlier files \(3, 8, 8\)"):
        GaussianStats.from_folder(images)
    assert GaussianStats.from_folder(images, size=8).shape == SHAPE

    arrays = tmp_path / "latents"
    arrays.mkdir()
    np.save(arrays / "part.npy", expected.numpy())
    torch.testing.assert_close(GaussianStats.from_folder(arrays).mean, expected.mean(0), rtol=0, atol=1e-12)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        GaussianStats.from_folder(tmp_path / "empty")


def test_bad_input_is_rejected_with_clear_errors(own_stats, noise, tmp_path):
    with pytest.raises(ValueError, match=r"stats have sample shape \(3, 8, 8\) but the sample has shape \(3, 16, 16\)"):
        tele = GaussianTeleport(DDIMScheduler(), own_stats, skip=0.5)
        tele.set_timesteps(4)
        tele.scale_model_input(torch.randn(1, 3, 16, 16), tele.timesteps[0])
    with pytest.raises(ValueError, match=r"eigvecs must have shape \(192, rank\)"):
        GaussianStats(torch.zeros(SHAPE), torch.zeros(100, 2), torch.ones(2))
    with pytest.raises(ValueError, match=r"eigvals must have shape \(2,\)"):
        GaussianStats(torch.zeros(SHAPE), torch.eye(192)[:, :2], torch.ones(3))
    with pytest.raises(ValueError, match="eigvals must be finite and >= 0"):
        GaussianStats(torch.zeros(SHAPE), torch.eye(192)[:, :2], torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="orthonormal columns"):
        GaussianStats(torch.zeros(SHAPE), torch.ones(192, 2), torch.ones(2))
    with pytest.raises(ValueError, match=r"cov must have shape \(192, 192\)"):
        GaussianStats.from_covariance(torch.zeros(SHAPE), torch.eye(10))
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, 192\]"):
        GaussianStats.from_samples(torch.randn(10, *SHAPE), rank=0)
    for skip in (-0.1, 1.0, 1.5, "half", True):
        with pytest.raises(ValueError, match=r"skip must be in \[0, 1\)"):
            GaussianTeleport(DDIMScheduler(), own_stats, skip=skip)
    with pytest.raises(TypeError, match="stats must be a GaussianStats, got Tensor"):
        GaussianTeleport(DDIMScheduler(), torch.zeros(SHAPE))
    with pytest.raises(TypeError, match="GaussianTeleport wraps a diffusers scheduler"):
        GaussianTeleport(object(), own_stats)
    with pytest.raises(TypeError, match="GaussianTeleport must be innermost"):
        GaussianTeleport(DualFast(TimeShift(DDIMScheduler())), own_stats)
    with pytest.raises(RuntimeError, match=r"skip='auto' needs a model to probe: .* calibrate\(model, 6\)"):
        GaussianTeleport(DDIMScheduler(), own_stats, skip="auto").set_timesteps(6)


class _Context:
    """A `SpecContext` for `GaussianTeleport.from_spec`: the model under test."""

    def __init__(self, label, moments, net=None):
        self.label, self._moments, self._net = label, moments, net

    def exact_moments(self):
        return self._moments

    def network(self):
        return self._net


def test_from_spec_takes_the_exact_moments_a_saved_file_or_refuses(gaussian, own_stats, tmp_path):
    moments = (gaussian.mu.reshape(SHAPE), full_covariance(gaussian))
    exact = GaussianTeleport.from_spec(DPMSolverPlusPlusScheduler(), {"skip": 0.3}, _Context("g", moments))
    direct = GaussianTeleport(DPMSolverPlusPlusScheduler(), GaussianStats.from_covariance(*moments), skip=0.3)
    assert torch.equal(exact.stats.eigvecs, direct.stats.eigvecs) and exact.skip == direct.skip
    own_stats.save(tmp_path / "stats.npz")
    saved = GaussianTeleport.from_spec(DPMSolverPlusPlusScheduler(), {"stats": str(tmp_path / "stats.npz")},
                                       _Context("g", None))
    assert torch.equal(saved.stats.mean, own_stats.mean)
    with pytest.raises(ValueError, match="model learned has no exact data moments; give stats: <file written by"):
        GaussianTeleport.from_spec(DPMSolverPlusPlusScheduler(), {}, _Context("learned", None))
