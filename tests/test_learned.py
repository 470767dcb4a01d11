"""The shipped learned model (offline loading, clear errors) and the exact distribution metrics."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import samplers
from samplers.evaluation.fid import frechet_distance
from samplers.testbeds import GaussianMixtureModel
from samplers.testbeds.learned import (
    ASSET_DIR,
    REGENERATE,
    LearnedModelError,
    eps_error,
    frechet_distance_to_mixture,
    load_learned_model,
    mixture_log_prob,
    mixture_moments,
    spread_ratio,
)


@pytest.fixture(scope="module")
def learned():
    return load_learned_model()


@pytest.fixture(scope="module")
def small_mixture():
    """Unequal weights and per-component stds, D = 16: every term of the formulas matters."""
    return GaussianMixtureModel(shape=(1, 4, 4), num_components=3, std=(0.1, 0.3, 0.5), seed=3,
                                weights=torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))


def test_shipped_weights_load_offline_and_run(learned):
    unet, mixture = learned
    assert isinstance(unet, UNet2DModel) and not unet.training
    assert mixture.shape == (3, 16, 16) and mixture.means.shape == (8, 768) and mixture.prediction_type == "epsilon"
    x = torch.randn(2, *mixture.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = unet(x, torch.tensor([10, 900])).sample
    assert out.shape == x.shape and out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    size = sum(f.stat().st_size for f in ASSET_DIR.rglob("*") if f.is_file())
    assert size < 8 * 2**20, f"shipped learned model is {size / 2**20:.1f} MiB"
    spec = json.loads((ASSET_DIR / "mixture.json").read_text())
    assert spec["training"]["eval_loss_ema"] < 1.5 * spec["training"]["eval_loss_exact_model"]


def test_shipped_folder_runs_in_stock_pipeline_with_our_scheduler():
    pipe = DDPMPipeline.from_pretrained(str(ASSET_DIR), local_files_only=True)
    pipe.scheduler = samplers.DPMSolverPlusPlusScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np", generator=torch.manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()


def test_learned_eps_is_close_to_exact_eps(learned):
    """A trained network is far closer to the exact eps than its norm (a random or mis-scheduled one is not)."""
    unet, mixture = learned
    for row in eps_error(unet, mixture, (100, 500, 900), num_samples=64):
        assert row["rms_error"] < 0.1 * row["rms_exact"], row


def test_exact_moments_match_monte_carlo(small_mixture):
    n = 200_000
    x = small_mixture.sample_data(n, torch.Generator().manual_seed(1)).reshape(n, -1).numpy()
    mean, cov = mixture_moments(small_mixture)
    se = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(x.mean(0) - mean) < 5 * se)
    mc_cov = np.cov(x, rowvar=False)
    assert np.abs(mc_cov - cov).max() < 0.02 * np.abs(cov).max()
    w = small_mixture.log_w.exp().numpy()
    between = np.cov(small_mixture.means.numpy().T, aweights=w, bias=True)  # sum w (mu - m)(mu - m)^T
    np.testing.assert_allclose(cov, between + (w @ small_mixture.vars.numpy()) * np.eye(16), rtol=0, atol=1e-13)


def test_shipped_mixture_mean_matches_monte_carlo(learned):
    _, mixture = learned
    n = 20_000
    x = mixture.sample_data(n, torch.Generator().manual_seed(2)).reshape(n, -1).numpy()
    mean, cov = mixture_moments(mixture)
    z = (x.mean(0) - mean) / np.sqrt(np.diag(cov) / n)
    assert np.abs(z).max() < 5.0
    assert abs(np.trace(np.cov(x, rowvar=False)) / np.trace(cov) - 1) < 0.03


def test_log_prob_matches_scipy(small_mixture):
    x = small_mixture.sample_data(50, torch.Generator().manual_seed(4))
    flat = x.reshape(50, -1).numpy()
    dense = np.stack([np.log(w) + multivariate_normal(mu, v * np.eye(16)).logpdf(flat) for w, mu, v in zip(
        small_mixture.log_w.exp().numpy(), small_mixture.means.numpy(), small_mixture.vars.numpy())])
    np.testing.assert_allclose(mixture_log_prob(x, small_mixture).numpy(), logsumexp(dense, axis=0), rtol=1e-12)


def test_frechet_distance_separates_true_shifted_and_learned_samples(learned):
    unet, mixture = learned
    n = 800
    true = mixture.sample_data(n, torch.Generator().manual_seed(5))
    fd_true = frechet_distance_to_mixture(true, mixture)
    shift = 0.1
    fd_shift = frechet_distance_to_mixture(true + shift, mixture)
    mean, _ = mixture_moments(mixture)
    offset = true.reshape(n, -1).mean(0).numpy() - mean
    # a shift leaves the covariance unchanged and adds |c|^2 + 2 c . (mean_hat - mean) to the mean term
    assert fd_shift - fd_true == pytest.approx(768 * shift**2 + 2 * shift * offset.sum(), abs=1e-6)
    noise = samplers.noise_from_seeds(range(n), mixture.shape)
    config = DDPMScheduler.load_config(ASSET_DIR, subfolder="scheduler")

    def fd_at_5_steps(**options):
        with torch.no_grad():
            x = samplers.sample(unet, samplers.DPMSolverPlusPlusScheduler.from_config(config, **options), noise, 5)
        return frechet_distance_to_mixture(x.samples, mixture)

    # 5 steps on a grid with an evaluation at t_min (the pre-0.1 default): far from the data (measured 55 vs 5.2)
    assert fd_at_5_steps(timestep_schedule="logsnr") > 3 * fd_true
    # the default logsnr_interior grid at the same 5 steps lands near the data (measured 6.0)
    assert fd_at_5_steps() < 1.5 * fd_true


def test_spread_ratio_is_one_for_data_above_for_noise_below_for_means(learned):
    _, mixture = learned
    data = mixture.sample_data(256, torch.Generator().manual_seed(3))
    ratio = spread_ratio(data, mixture)
    assert ratio.shape == (256,) and abs(float(ratio.mean()) - 1) < 0.02  # chi^2_D / D, D = 768
    noisy = data + 0.15 * torch.randn(data.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    torch.testing.assert_close(spread_ratio(noisy, mixture).mean(), torch.tensor(2.0, dtype=torch.float64), rtol=0.05,
                               atol=0)  # the component std is 0.15: noise of the same size doubles the spread
    g = torch.Generator().manual_seed(5)
    modes = mixture.means[torch.randint(len(mixture.means), (64,), generator=g)]
    smooth = modes + 0.075 * torch.randn(modes.shape, generator=g, dtype=torch.float64)  # half the component std
    torch.testing.assert_close(spread_ratio(smooth, mixture).mean(), torch.tensor(0.25, dtype=torch.float64),
                               rtol=0.05, atol=0)
    with pytest.raises(ValueError, match="samples have 12 values each"):
        spread_ratio(torch.zeros(2, 12), mixture)


def test_frechet_distance_equals_pytorch_fid_formula(small_mixture):
    x = small_mixture.sample_data(100, torch.Generator().manual_seed(6)) * 1.1 + 0.05
    flat = x.reshape(100, -1).numpy()
    expected = frechet_distance(flat.mean(0), np.cov(flat, rowvar=False), *mixture_moments(small_mixture))
    assert frechet_distance_to_mixture(x, small_mixture) == pytest.approx(expected, rel=1e-9)


def test_metric_input_errors(small_mixture):
    with pytest.raises(ValueError, match="samples have 9 values each, the mixture has dimension 16"):
        mixture_log_prob(torch.zeros(2, 9), small_mixture)
    with pytest.raises(ValueError, match="need at least 2 samples"):
        frechet_distance_to_mixture(torch.zeros(1, 16), small_mixture)


def test_missing_folder_names_path_and_regenerate_command(tmp_path):
    path = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        load_learned_model(path)
    assert str(path) in str(err.value) and REGENERATE in str(err.value)


@pytest.fixture
def asset_copy(tmp_path):
    return shutil.copytree(ASSET_DIR, tmp_path / "model")


def test_missing_weights_file_is_named(asset_copy):
    (asset_copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_learned_model(asset_copy)


@pytest.mark.parametrize(("file", "text", "message"), [
    ("unet/config.json", "{not json", "the UNet does not load"),
    ("unet/diffusion_pytorch_model.safetensors", "garbage", "the UNet does not load"),
    ("mixture.json", "{not json", "mixture.json is not valid JSON"),
    ("mixture.json", "[1, 2]", "must hold a JSON object"),
])
def test_corrupt_files_give_clear_errors(asset_copy, file, text, message):
    (asset_copy / file).write_text(text)
    with pytest.raises(LearnedModelError, match=message) as err:
        load_learned_model(asset_copy)
    assert str(asset_copy) in str(err.value) and REGENERATE in str(err.value)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda spec: spec.pop("seed"), r"lacks the keys \['seed'\]"),
    (lambda spec: spec.update(seed=1), "fingerprint"),
    (lambda spec: spec.update(std="wide"), "does not describe a mixture"),
    (lambda spec: spec.update(shape=[3, 8, 8]), "fingerprint"),
])
def test_inconsistent_mixture_spec_is_rejected(asset_copy, edit, message):
    file = asset_copy / "mixture.json"
    spec = json.loads(file.read_text())
    edit(spec)
    file.write_text(json.dumps(spec))
    with pytest.raises(LearnedModelError, match=message):
        load_learned_model(asset_copy)


def test_unet_that_does_not_fit_the_mixture_is_rejected(asset_copy):
    file = asset_copy / "unet" / "config.json"
    file.write_text(file.read_text().replace('"sample_size": 16', '"sample_size": 8'))
    with pytest.raises(LearnedModelError, match=r"mixture shape \[3, 16, 16\] does not match the UNet's input"):
        load_learned_model(asset_copy)
