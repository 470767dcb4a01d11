"""Download on first use, verified and cached, and offline mode: the real download code against a local server.

A threaded HTTP server on 127.0.0.1, started here, serves small files the tests make (a weights file named with
its SHA-256 prefix, a CIFAR-format archive) and counts requests; nothing else is contacted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import pickle
import socket
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from samplers.evaluation import downloads, fid, sweep

REPO = Path(__file__).resolve().parents[1]


class FileServer:
    """Serves ``files[url path]``: a list of bodies sent in turn (the last one repeats); records every request."""

    def __init__(self) -> None:
        self.files: dict[str, list[bytes]] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, send_body: bool) -> None:
                server.requests.append(f"{self.command} {self.path}")
                bodies = server.files.get(self.path)
                if not bodies:
                    self.send_error(404)
                    return
                body = bodies[0] if len(bodies) == 1 else bodies.pop(0)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                self._reply(True)

            def do_HEAD(self) -> None:  # noqa: N802
                self._reply(False)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[FileServer]:
    s = FileServer()
    yield s
    s.close()


@pytest.fixture
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fresh torch hub and project caches, online unless a test says otherwise."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv(downloads.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(downloads.OFFLINE_ENV, raising=False)
    return tmp_path


def dead_port() -> int:
    """A local port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_weights(server: FileServer, body: bytes, monkeypatch: pytest.MonkeyPatch, name: str = "fid") -> Path:
    """Publish ``body`` under a torch.hub-style name (``<name>-<sha256[:8]>.pth``); returns its cache path."""
    file_name = f"{name}-{hashlib.sha256(body).hexdigest()[:8]}.pth"
    server.files[f"/w/{file_name}"] = [body]
    monkeypatch.setenv(fid.FID_WEIGHTS_URL_ENV, f"{server.url}/w/{file_name}")
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


# ------------------------------------------------------------------------------------------------ weights


def test_weights_first_download_then_cache_hit(
    server: FileServer, caches: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    body = np.random.default_rng(0).bytes(5000)
    dest = serve_weights(server, body, monkeypatch)
    assert dest == caches / "torch_home" / "hub" / "checkpoints" / dest.name
    assert fid.default_weights_path() == dest
    assert fid.resolve_weights_path() == dest
    assert dest.read_bytes() == body
    assert len(server.requests) == 1
    err = capsys.readouterr().err
    assert f"fetched pytorch-fid's FID Inception weights (4.9 KiB) into {dest}" in err
    assert fid.resolve_weights_path() == dest
    assert len(server.requests) == 1, "a verified cached file is used without any request"
    assert list(dest.parent.iterdir()) == [dest], "no partial files are left behind"


def test_truncated_files_are_downloaded_again(
    server: FileServer, caches: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    body = np.random.default_rng(1).bytes(4000)
    dest = serve_weights(server, body, monkeypatch)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(body[:1000])  # an interrupted copy in the cache
    server.files[f"/w/{dest.name}"] = [body[:2500], body]  # and the first transfer is cut short too
    assert fid.resolve_weights_path() == dest
    assert dest.read_bytes() == body
    assert len(server.requests) == 2
    err = capsys.readouterr().err
    assert "truncated or not the right one; downloading it again" in err
    assert "downloading it once more" in err


def test_wrong_hash_is_refused_after_one_retry(
    server: FileServer, caches: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = serve_weights(server, b"the real file", monkeypatch)
    server.files[f"/w/{dest.name}"] = [b"another file"]
    with pytest.raises(downloads.DownloadError, match=f"twice.*{dest.name[4:12]}.*{dest}") as err:
        fid.resolve_weights_path()
    assert "invalid hash value" in str(err.value)
    assert len(server.requests) == 2
    assert not dest.exists() and not list(dest.parent.iterdir()), "nothing is saved"


def test_server_down_error_suggests_offline_mode(caches: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fid.FID_WEIGHTS_URL_ENV, f"http://127.0.0.1:{dead_port()}/w/fid-0123abcd.pth")
    with pytest.raises(downloads.DownloadError) as err:
        fid.load_fid_inception(dims=64, device="cpu")
    message = str(err.value)
    assert "cannot download pytorch-fid's FID Inception weights" in message
    assert str(fid.default_weights_path()) in message and "--offline" in message
    monkeypatch.setenv(fid.FID_WEIGHTS_URL_ENV, "http://127.0.0.1:1/w/no_hash_in_name.pth")
    with pytest.raises(downloads.DownloadError, match="carries no SHA-256 prefix"):
        fid.resolve_weights_path()


# ------------------------------------------------------------------------------------------------ CIFAR-10 and stats


def cifar_archive(per_batch: int) -> tuple[bytes, dict[str, np.ndarray]]:
    """A CIFAR-10 python-format tar.gz with ``per_batch`` images per batch, and the images of each split."""
    rng = np.random.default_rng(2)
    buffer, splits = io.BytesIO(), {"train": [], "test": []}
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in [*fid.CIFAR10_BATCHES["train"], *fid.CIFAR10_BATCHES["test"]]:
            images = rng.integers(0, 256, size=(per_batch, 32, 32, 3), dtype=np.uint8)
            splits["test" if name == "test_batch" else "train"].append(images)
            rows = images.transpose(0, 3, 1, 2).reshape(per_batch, 3072)  # CIFAR rows: R plane, G plane, B plane
            data = pickle.dumps({"data": rows, "labels": [0] * per_batch})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue(), {k: np.concatenate(v) for k, v in splits.items()}


def load_cli():
    spec = importlib.util.spec_from_file_location("fid_cli", REPO / "scripts" / "fid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised FID Inception state dict (the real architecture and file size)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save(fid.build_fid_inception_without_weights().state_dict(), path)
    return path


@pytest.fixture
def served_inputs(
    server: FileServer, caches: Path, monkeypatch: pytest.MonkeyPatch, weights_file: Path
) -> dict[str, np.ndarray]:
    """The random Inception weights and a small CIFAR archive on the local server; a folder of samples."""
    serve_weights(server, weights_file.read_bytes(), monkeypatch, name="pt_inception")
    archive, splits = cifar_archive(per_batch=3)
    server.files["/cifar/cifar-10-python.tar.gz"] = [archive]
    monkeypatch.setenv(fid.CIFAR10_URL_ENV, f"{server.url}/cifar/cifar-10-python.tar.gz")
    monkeypatch.setenv(fid.CIFAR10_MD5_ENV, hashlib.md5(archive).hexdigest())
    samples = np.random.default_rng(3).integers(0, 200, size=(5, 32, 32, 3), dtype=np.uint8)
    (caches / "samples").mkdir()
    for i, image in enumerate(samples):
        Image.fromarray(image).save(caches / "samples" / f"{i}.png")
    return {**splits, "samples": samples}


def test_fid_against_cifar10_train_downloads_once_and_caches_the_stats(
    served_inputs: dict[str, np.ndarray],
    server: FileServer,
    caches: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    cli = load_cli()
    calls = []
    compute = fid.stats_from_uint8

    def counted(*args: object, **kwargs: object) -> fid.FeatureStats:
        calls.append(args)
        return compute(*args, **kwargs)

    monkeypatch.setattr(fid, "stats_from_uint8", counted)
    argv = [str(caches / "samples"), "cifar10-train", "--dims", "64", "--device", "cpu"]

    assert cli.main(argv) == 0
    first = capsys.readouterr()
    value = float(first.out.strip().splitlines()[-1].removeprefix("FID: "))
    assert len(calls) == 2, "stats of the samples and of CIFAR-10 train"
    weights_requests = [r for r in server.requests if r.startswith("GET /w/")]
    assert len(weights_requests) == 1
    # torchvision's download first probes the URL for redirects (a GET whose body it does not read), then fetches
    assert server.requests.count("GET /cifar/cifar-10-python.tar.gz") == 2
    assert "fetched CIFAR-10 (" in first.err and "computed cifar10-train stats (15 images, 64 dims)" in first.err

    model = fid.load_fid_inception(dims=64, device="cpu")
    train = compute(served_inputs["train"], model)
    assert train.count == 15
    cached = fid.reference_stats_path("cifar10-train", 64, model.weights_sha256)
    assert cached.parent == caches / "cache" / "fid_stats"
    np.testing.assert_allclose(fid.load_stats(cached)[0], train.mean(), rtol=1e-6, atol=1e-7)
    ours = compute(served_inputs["samples"], model)
    assert value == pytest.approx(fid.frechet_distance(ours.mean(), ours.cov(), train.mean(), train.cov()), rel=1e-6)

    calls.clear()
    requests = len(server.requests)
    assert cli.main(argv) == 0
    second = capsys.readouterr()
    assert float(second.out.strip().splitlines()[-1].removeprefix("FID: ")) == value
    assert len(calls) == 1, "the second run computes only the samples' stats"
    assert len(server.requests) == requests, "and makes no request"
    assert f"using cached cifar10-train stats {cached}" in second.err

    # --save-stats of a name writes the cached stats out as a pytorch-fid file (with the sample count)
    out = caches / "train_stats.npz"
    assert cli.main(["--save-stats", "cifar10-train", str(out), "--dims", "64", "--device", "cpu"]) == 0
    assert out.read_bytes() == cached.read_bytes() and fid.FeatureStats.from_npz(out).count == 15
    assert len(calls) == 1 and len(server.requests) == requests

    # The other split is another cache entry, computed from the already extracted archive.
    test_stats = fid.reference_stats("cifar10-test", model, offline=True)
    np.testing.assert_allclose(test_stats[0], compute(served_inputs["test"], model).mean(), rtol=1e-6)
    assert len(server.requests) == requests


def test_cifar10_archive_is_md5_checked_and_server_down_suggests_offline(
    served_inputs: dict[str, np.ndarray], server: FileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(fid.CIFAR10_MD5_ENV, "0" * 32)
    with pytest.raises(downloads.DownloadError, match="does not have MD5 0000"):
        fid.cifar10_images("test")
    monkeypatch.setenv(fid.CIFAR10_URL_ENV, f"http://127.0.0.1:{dead_port()}/cifar-10-python.tar.gz")
    with pytest.raises(downloads.DownloadError, match="cannot download or extract CIFAR-10 .*--offline"):
        fid.cifar10_images("test")
    assert not (fid.cifar10_dir() / "cifar-10-batches-py").exists()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_offline_makes_no_request_and_names_everything_missing(
    how: str,
    served_inputs: dict[str, np.ndarray],
    server: FileServer,
    caches: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    cli = load_cli()
    argv = [str(caches / "samples"), "cifar10-train", "--dims", "64", "--device", "cpu"]
    if how == "flag":
        argv.append("--offline")
    else:
        monkeypatch.setenv(downloads.OFFLINE_ENV, "1")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert server.requests == []
    assert err.count("error:") == 1 and "2 needed file(s) are missing" in err
    assert str(fid.default_weights_path()) in err and fid.weights_url() in err
    assert str(caches / "cache" / "cifar10" / "cifar-10-python.tar.gz") in err
    assert "Traceback" not in err

    # Two stats files need no network, and so nothing is missing.
    stats = fid.FeatureStats(64)
    stats.update(np.random.default_rng(4).normal(size=(80, 64)))
    stats.to_npz(caches / "stats.npz")
    assert cli.main([str(caches / "stats.npz"), str(caches / "stats.npz"), *argv[2:]]) == 0
    assert abs(float(capsys.readouterr().out.removeprefix("FID: "))) < 1e-6

    # The files put where the message says: the same offline command works, still without a request.
    archive = caches / "cache" / "cifar10" / "cifar-10-python.tar.gz"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(server.files["/cifar/cifar-10-python.tar.gz"][0])
    fid.default_weights_path().parent.mkdir(parents=True)
    fid.default_weights_path().write_bytes(server.files[fid.weights_url().removeprefix(server.url)][0])
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.startswith("FID: ")
    assert server.requests == []


# ------------------------------------------------------------------------------------------------ sweeps


def test_sweep_fid_stats_by_name_offline_then_online(
    served_inputs: dict[str, np.ndarray],
    server: FileServer,
    caches: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    spec = importlib.util.spec_from_file_location("sweep_cli", REPO / "scripts" / "sweep.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    gmm = {"name": "gmm", "label": "gmm8", "shape": [3, 8, 8], "num_components": 4, "std": 0.2}
    grid = {"models": [gmm], "solvers": ["dpmsolver++"], "nfe": [2], "seeds": {"num_blocks": 2, "block_size": 3},
            "reference": None, "metric": {"pixel_resolution": 4, "inception_dims": 64, "fid_stats": "cifar10-train",
                                          "image_grid": 0}}
    config = caches / "grid.yaml"
    hub_model = {"name": "diffusers", "label": "hub", "path": "no-such-user/ddpm-not-cached"}
    config.write_text(yaml.safe_dump({**grid, "models": [gmm, hub_model]}))

    assert cli.main(["--out", str(caches / "offline"), "--config", str(config), "--offline"]) == 2
    err = capsys.readouterr().err
    assert server.requests == []
    assert err.count("error:") == 1 and "3 needed file(s) are missing" in err
    assert "huggingface-cli download no-such-user/ddpm-not-cached" in err
    assert str(fid.default_weights_path()) in err and "cifar-10-batches-py" in err
    assert not (caches / "offline").exists(), "nothing is written before the inputs are complete"

    results = sweep.run_sweep(grid, caches / "online", log=lambda line: None)
    (row,) = results["rows"]
    model = fid.load_fid_inception(dims=64, device="cpu")
    mu, sigma = fid.load_stats(fid.reference_stats_path("cifar10-train", 64, model.weights_sha256))
    blocks = sorted((caches / "online" / "blocks" / row["config_id"]).glob("block_*.npz"))
    feats = np.concatenate([np.load(b)["inception_features"] for b in blocks])
    assert feats.shape == (6, 64)
    expected = fid.frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), mu, sigma)
    assert row["inception_fid"] == pytest.approx(expected, rel=1e-6)
    assert server.requests.count(f"GET {fid.weights_url().removeprefix(server.url)}") == 1
