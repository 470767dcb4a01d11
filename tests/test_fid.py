"""FID module: Frechet numerics, streaming stats, the offline Inception path (random weights), stats files, CLI.

The Inception network is the real architecture with random weights written to a file; pytorch-fid's own
pipeline (its downloader pointed at that file) is the reference.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_fid import fid_score
from pytorch_fid import inception as pf_inception

from samplers.evaluation import downloads, fid

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "scripts" / "fid.py"


def random_spd(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.normal(size=(d, rank or 2 * d))
    return a @ a.T / a.shape[1]


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random FID Inception state dict whose activations keep an O(1) scale through the network."""
    g = torch.Generator().manual_seed(0)
    net = fid.build_fid_inception_without_weights()
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=g)
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1, generator=g)
            module.running_var.uniform_(0.5, 1.5, generator=g)
            module.weight.data.uniform_(0.8, 1.2, generator=g)
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def model64(weights_file: Path) -> fid.FIDInceptionV3:
    return fid.load_fid_inception(weights_file, dims=64, device="cpu")


def pytorch_fid_model(weights_file: Path, dims: int, monkeypatch: pytest.MonkeyPatch) -> torch.nn.Module:
    """pytorch-fid's own InceptionV3, its download replaced by reading ``weights_file``."""
    monkeypatch.setattr(
        pf_inception, "load_state_dict_from_url", lambda *a, **k: torch.load(weights_file, weights_only=True)
    )
    return pf_inception.InceptionV3([pf_inception.InceptionV3.BLOCK_INDEX_BY_DIM[dims]]).eval()


def write_pngs(folder: Path, images: np.ndarray) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, image in enumerate(images):
        files.append(folder / f"{i:03d}.png")
        Image.fromarray(image).save(files[-1])
    return files


def random_uint8(seed: int, n: int, size: int = 32, high: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, size=(n, size, size, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------------------
# Frechet distance numerics
# ------------------------------------------------------------------------------------------------------------


def test_frechet_identical_stats_is_zero() -> None:
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=24), random_spd(rng, 24)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_identity_covariances_give_squared_mean_distance() -> None:
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    value = fid.frechet_distance(mu1, np.eye(10), mu2, np.eye(10))
    assert value == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-12)


def test_frechet_diagonal_covariances_closed_form() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 3.0, size=12), rng.uniform(0.1, 3.0, size=12)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + np.sum((mu1 - mu2) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("rank", [None, 5])
def test_frechet_matches_pytorch_fid(rank: int | None) -> None:
    rng = np.random.default_rng(3)
    for _ in range(3):
        mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
        s1, s2 = random_spd(rng, 32, rank), random_spd(rng, 32, rank)
        ours = fid.frechet_distance(mu1, s1, mu2, s2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # pytorch-fid passes scipy's deprecated disp
            theirs = fid_score.calculate_frechet_distance(mu1, s1, mu2, s2)
        assert ours == pytest.approx(theirs, rel=1e-6)
        assert ours > 0


def test_frechet_rejects_mismatched_dims() -> None:
    with pytest.raises(fid.FIDError, match="dims differ"):
        fid.frechet_distance(np.zeros(64), np.eye(64), np.zeros(2048), np.eye(2048))


def test_kid_matches_naive_unbiased_mmd() -> None:
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(20, 6)), rng.normal(0.5, 1.0, size=(20, 6))

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (a @ b / 6 + 1) ** 3

    n = len(x)
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    cross = sum(k(x[i], y[j]) for i in range(n) for j in range(n)) / n**2
    mean, std = fid.kernel_inception_distance(x, y, num_subsets=3, subset_size=n)
    assert mean == pytest.approx(within - 2 * cross, rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)  # every subset is the whole set
    same, _ = fid.kernel_inception_distance(x, rng.normal(size=(20, 6)), num_subsets=3, subset_size=n)
    assert abs(same) < mean


# ------------------------------------------------------------------------------------------------------------
# Streaming statistics
# ------------------------------------------------------------------------------------------------------------


def test_feature_stats_batched_and_merged_match_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(301, 9)) * rng.uniform(0.01, 3.0, size=9) + 50.0  # large offset: no naive sums
    expected_mu, expected_cov = x.mean(0), np.cov(x, rowvar=False)

    batched = fid.FeatureStats(9)
    for start, stop in [(0, 1), (1, 1), (1, 64), (64, 200), (200, 301)]:
        batched.update(torch.from_numpy(x[start:stop]) if start == 64 else x[start:stop])
    assert batched.count == 301
    np.testing.assert_allclose(batched.mean(), expected_mu, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(batched.cov(), expected_cov, rtol=1e-10, atol=1e-10)

    shard_a, shard_b = fid.FeatureStats(9), fid.FeatureStats(9)
    shard_a.update(x[:120])
    shard_b.update(x[120:250])
    shard_b.update(x[250:])
    shard_b.to_npz(tmp_path / "shard_b.npz")
    merged = fid.FeatureStats(9).merge(shard_a).merge(fid.FeatureStats.from_npz(tmp_path / "shard_b.npz"))
    assert merged.count == 301
    np.testing.assert_allclose(merged.mean(), expected_mu, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(merged.cov(), expected_cov, rtol=1e-10, atol=1e-10)


def test_feature_stats_errors() -> None:
    stats = fid.FeatureStats(4)
    stats.update(np.ones((1, 4)))
    with pytest.raises(fid.FIDError, match="at least 2"):
        stats.cov()
    with pytest.raises(fid.FIDError, match=r"\(B, 4\)"):
        stats.update(np.ones((3, 5)))
    with pytest.raises(fid.FIDError, match="merge"):
        stats.merge(fid.FeatureStats(5))


# ------------------------------------------------------------------------------------------------------------
# Stats files
# ------------------------------------------------------------------------------------------------------------


def test_stats_npz_round_trips_through_pytorch_fid(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    files = []
    for i, shift in enumerate([0.0, 0.7]):
        stats = fid.FeatureStats(16)
        stats.update(rng.normal(shift, 1.0, size=(200, 16)))
        files.append(tmp_path / f"s{i}.npz")
        stats.to_npz(files[-1])
    (m1, s1), (m2, s2) = (fid_score.compute_statistics_of_path(str(f), None, 1, 16, "cpu") for f in files)
    np.testing.assert_array_equal(m1, fid.load_stats(files[0])[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        theirs = fid_score.calculate_frechet_distance(m1, s1, m2, s2)
    assert theirs > 1.0
    # Two stats files need no network weights at all (the path given does not exist).
    ours = fid.fid_from_paths(*files, weights=tmp_path / "absent.pth", dims=16)
    assert ours == pytest.approx(theirs, rel=1e-9)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"m": np.zeros(3), "s": np.eye(3)}, "expected 'mu' and 'sigma'"),
        ({"mu": np.zeros(3), "sigma": np.zeros((3, 4))}, "square"),
        ({"mu": np.zeros(3), "sigma": np.eye(4)}, "square"),
        ({"mu": np.zeros((3, 3)), "sigma": np.eye(3)}, "1-D"),
        ({"mu": np.full(3, np.nan), "sigma": np.eye(3)}, "NaN"),
    ],
)
def test_load_stats_rejects_bad_files(tmp_path: Path, arrays: dict, message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(fid.FIDError, match=message):
        fid.load_stats(path)


def test_fid_from_paths_rejects_stats_of_different_dims(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", mu=np.zeros(64), sigma=np.eye(64))
    np.savez(tmp_path / "b.npz", mu=np.zeros(192), sigma=np.eye(192))
    with pytest.raises(fid.FIDError, match="64.*192"):
        fid.fid_from_paths(tmp_path / "a.npz", tmp_path / "b.npz")
    (tmp_path / "not_stats.npz").write_bytes(b"not a zip file")
    with pytest.raises(fid.FIDError, match="not_stats.npz"):
        fid.fid_from_paths(tmp_path / "a.npz", tmp_path / "not_stats.npz")


# ------------------------------------------------------------------------------------------------------------
# The Inception network
# ------------------------------------------------------------------------------------------------------------


def test_inception_features_match_pytorch_fid(weights_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = fid.load_fid_inception(weights_file, dims=2048, device="cpu")
    images = torch.from_numpy(random_uint8(7, 3)).permute(0, 3, 1, 2)
    features = model.features(images)
    assert features.shape == (3, 2048)
    assert torch.isfinite(features).all()
    assert features.std(0).mean() > 1e-3  # the images are told apart
    torch.testing.assert_close(model.features(images), features, rtol=0, atol=0)

    reference = pytorch_fid_model(weights_file, 2048, monkeypatch)
    with torch.no_grad():
        expected = reference(images.float() / 255)[0].flatten(1)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)


def test_samples_to_uint8_quantisation() -> None:
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 1.0, 2.0])
    expected = [0, 0, 0, 128, 191, 255, 255]  # round((x + 1) * 127.5): 127.5 -> 128, 191.25 -> 191
    assert fid.samples_to_uint8(x).tolist() == expected
    with pytest.raises(ValueError, match="NaN"):
        fid.samples_to_uint8(torch.tensor([0.0, float("nan")]))


def test_sample_stats_equal_pytorch_fid_on_saved_pngs(
    tmp_path: Path, weights_file: Path, model64: fid.FIDInceptionV3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Samples in [-1, 1] -> our stats == pytorch-fid's stats of the same samples saved as PNG files."""
    samples = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(8)) * 2.2 - 1.1
    ours = fid.stats_from_samples(samples, model64, batch_size=4)

    pngs = fid.samples_to_uint8(samples).permute(0, 2, 3, 1).numpy()
    files = write_pngs(tmp_path / "pngs", pngs)
    reference = pytorch_fid_model(weights_file, 64, monkeypatch)
    mu, sigma = fid_score.calculate_activation_statistics(files, reference, 4, 64, "cpu", 0)
    np.testing.assert_allclose(ours.mean(), mu, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ours.cov(), sigma, rtol=1e-4, atol=1e-9)

    # The same images read from the folder or from an images .npz give the same stats.
    np.savez(tmp_path / "images.npz", images=pngs)
    for source in (tmp_path / "pngs", tmp_path / "images.npz"):
        stats = fid.stats_from_path(source, model64, batch_size=4)
        np.testing.assert_allclose(stats.mean(), ours.mean(), rtol=1e-12, atol=0)
        np.testing.assert_allclose(stats.cov(), ours.cov(), rtol=1e-10, atol=1e-16)


def test_image_sources_reject_bad_input(tmp_path: Path, model64: fid.FIDInceptionV3) -> None:
    write_pngs(tmp_path / "one", random_uint8(9, 1))
    with pytest.raises(fid.FIDError, match="at least 2 images"):
        fid.stats_from_path(tmp_path / "one", model64)
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(fid.FIDError, match="uint8"):
        fid.stats_from_path(tmp_path / "float.npz", model64)
    with pytest.raises(fid.FIDError, match="at least 2 images"):
        fid.stats_from_uint8(random_uint8(9, 1), model64).cov()
    with pytest.raises(fid.FIDError, match=str(tmp_path / "no_cifar")):
        fid.stats_from_path(f"cifar10:{tmp_path / 'no_cifar'}", model64)


def test_missing_weights_error_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(fid.FIDError, match=str(tmp_path / "nope.pth")):
        fid.load_fid_inception(tmp_path / "nope.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(fid.FID_WEIGHTS_URL_ENV, raising=False)
    expected = tmp_path / "torch_home" / "hub" / "checkpoints" / fid.FID_WEIGHTS_FILENAME
    assert fid.default_weights_path() == expected
    with pytest.raises(downloads.MissingFiles) as err:
        fid.load_fid_inception(offline=True)
    assert str(expected) in str(err.value)
    assert fid.FID_WEIGHTS_URL in str(err.value)


def test_weights_found_in_torch_hub_cache(
    tmp_path: Path, weights_file: Path, model64: fid.FIDInceptionV3, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv(fid.FID_WEIGHTS_URL_ENV, f"http://127.0.0.1:9/random-{downloads.file_sha256(weights_file)[:8]}.pth")
    fid.default_weights_path().parent.mkdir(parents=True)
    fid.default_weights_path().symlink_to(weights_file)
    model = fid.load_fid_inception(dims=64, device="cpu")  # verified in the cache: no request to the dead URL
    images = torch.from_numpy(random_uint8(10, 2)).permute(0, 3, 1, 2)
    torch.testing.assert_close(model.features(images), model64.features(images), rtol=0, atol=0)


def test_corrupt_weights_are_rejected(tmp_path: Path, weights_file: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(np.random.default_rng(11).bytes(4096))
    with pytest.raises(fid.FIDError, match="corrupt or not a PyTorch state dict"):
        fid.load_fid_inception(junk)

    wrong_keys = tmp_path / "wrong_keys.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong_keys)
    with pytest.raises(fid.FIDError, match="missing keys"):
        fid.load_fid_inception(wrong_keys)

    state = torch.load(weights_file, weights_only=True)
    state["Mixed_7c.branch_pool.conv.weight"] = torch.zeros(1, 1, 1, 1)
    wrong_shape = tmp_path / "wrong_shape.pth"
    torch.save(state, wrong_shape)
    with pytest.raises(fid.FIDError, match="wrong shapes.*Mixed_7c.branch_pool.conv.weight"):
        fid.load_fid_inception(wrong_shape)


# ------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(CLI), *args], capture_output=True, text=True, timeout=120, cwd=REPO.parent, env=env
    )


def test_cli_fid_of_two_folders(tmp_path: Path, weights_file: Path, model64: fid.FIDInceptionV3) -> None:
    write_pngs(tmp_path / "a", random_uint8(12, 6))
    write_pngs(tmp_path / "b", random_uint8(13, 6, high=128))
    options = ["--dims", "64", "--device", "cpu", "--inception-weights", str(weights_file)]
    result = run_cli(str(tmp_path / "a"), str(tmp_path / "b"), *options)
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("FID: ")
    a, b = (fid.stats_from_path(tmp_path / name, model64) for name in "ab")
    expected = fid.frechet_distance(a.mean(), a.cov(), b.mean(), b.cov())
    assert float(last.removeprefix("FID: ")) == pytest.approx(expected, rel=1e-6)
    assert expected > 0


def test_cli_one_image_is_a_user_error(tmp_path: Path, weights_file: Path) -> None:
    write_pngs(tmp_path / "a", random_uint8(14, 3))
    write_pngs(tmp_path / "one", random_uint8(15, 1))
    result = run_cli(str(tmp_path / "a"), str(tmp_path / "one"), "--inception-weights", str(weights_file))
    assert result.returncode == 2
    assert "at least 2 images" in result.stderr
    assert "Traceback" not in result.stderr


def load_cli_module():
    spec = importlib.util.spec_from_file_location("fid_cli", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_save_stats_and_user_errors(
    tmp_path: Path, weights_file: Path, model64: fid.FIDInceptionV3, capsys: pytest.CaptureFixture
) -> None:
    cli = load_cli_module()
    write_pngs(tmp_path / "a", random_uint8(16, 4))
    out = tmp_path / "a_stats.npz"
    common = ["--dims", "64", "--device", "cpu", "--inception-weights", str(weights_file)]
    assert cli.main(["--save-stats", str(tmp_path / "a"), str(out), *common]) == 0
    mu, sigma = fid.load_stats(out)
    expected = fid.stats_from_path(tmp_path / "a", model64)
    np.testing.assert_allclose(mu, expected.mean(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sigma, expected.cov(), rtol=1e-6, atol=1e-12)

    assert cli.main([str(out), str(tmp_path / "a"), *common]) == 0
    assert abs(float(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("FID: "))) < 1e-6

    cases = [
        (["--save-stats", str(tmp_path / "a"), str(out), *common], "already exists"),
        ([str(out), str(tmp_path / "a"), "--inception-weights", str(weights_file)], "--dims 64"),
        ([str(tmp_path / "a"), str(tmp_path / "a"), "--inception-weights", str(tmp_path / "x.pth")], "x.pth"),
        ([str(out), str(tmp_path / "missing")], "not found"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err
        assert err.count("\n") == 1
