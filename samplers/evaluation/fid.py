"""Frechet Inception Distance (and KID) with pytorch-fid's FID Inception network.

* The network is pytorch-fid's ``InceptionV3`` with ``use_fid_inception=True`` (the TF-FID port), built here
  without weights and loaded from a local file: pass a path, or let the default
  ``pt_inception-2015-12-05-6726825d.pth`` be downloaded on first use into the torch hub cache
  (``torch.hub.get_dir()/checkpoints``) and verified against the SHA-256 prefix in its name.
  ``$SAMPLERS_FID_WEIGHTS_URL`` points the download at a mirror (same naming convention).
* Reference statistics by name, ``cifar10-train`` / ``cifar10-test``: computed once from CIFAR-10 (downloaded
  with torchvision into the project cache) and cached, keyed by split, dims and the weights' SHA-256.
* Offline (``offline=True`` or ``HF_HUB_OFFLINE=1``) nothing is requested; everything missing is named in one
  :class:`~samplers.evaluation.downloads.MissingFiles` error.
* Images are uint8-quantised before the network, exactly as when samples are saved as PNG and read back by
  pytorch-fid: ``[-1, 1]`` float -> ``round((x + 1) * 127.5)`` clamped to 0..255 -> ``/ 255`` -> bilinear
  resize to 299 inside ``InceptionV3`` -> pool features.
* :class:`FeatureStats` accumulates mean and covariance in float64 (Chan's parallel update), so 50k images
  never sit in memory and shards from several processes can be merged.
* Stats files are pytorch-fid ``.npz`` files (keys ``mu``, ``sigma``; ours add the sample count ``n``).

User errors (missing files, too few images, mismatched dims) raise :class:`FIDError`, with an actionable
message.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from pytorch_fid.inception import (
    FID_WEIGHTS_URL,
    FIDInceptionA,
    FIDInceptionC,
    FIDInceptionE_1,
    FIDInceptionE_2,
    InceptionV3,
)
from scipy import linalg
from torch import nn
from torchvision.datasets.utils import check_integrity, download_and_extract_archive
from tqdm import tqdm

from .downloads import (
    DownloadError,
    Missing,
    MissingFiles,
    cache_dir,
    fetch_verified,
    file_sha256,
    human_size,
    is_offline,
    offline_hint,
    require,
    say,
)

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_DIMS = tuple(InceptionV3.BLOCK_INDEX_BY_DIM)
IMAGE_EXTENSIONS = frozenset({"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"})
FID_WEIGHTS_URL_ENV = "SAMPLERS_FID_WEIGHTS_URL"
CIFAR10_URL = torchvision.datasets.CIFAR10.url
CIFAR10_MD5 = torchvision.datasets.CIFAR10.tgz_md5
CIFAR10_URL_ENV, CIFAR10_MD5_ENV = "SAMPLERS_CIFAR10_URL", "SAMPLERS_CIFAR10_MD5"
CIFAR10_PREFIXES = {"cifar10:": True, "cifar10-test:": False}
CIFAR10_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
#: reference statistics by name -> CIFAR-10 split
REFERENCE_STATS = {"cifar10-train": "train", "cifar10-test": "test"}

__all__ = [
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "FID_DIMS",
    "FID_WEIGHTS_FILENAME",
    "FID_WEIGHTS_URL",
    "FIDError",
    "FIDInceptionV3",
    "FeatureStats",
    "REFERENCE_STATS",
    "build_fid_inception_without_weights",
    "cifar10_dir",
    "cifar10_images",
    "default_weights_path",
    "fid_from_paths",
    "frechet_distance",
    "kernel_inception_distance",
    "list_image_files",
    "load_fid_inception",
    "load_stats",
    "missing_inputs",
    "reference_stats",
    "reference_stats_path",
    "resolve_weights_path",
    "samples_to_uint8",
    "stats_from_path",
    "stats_from_samples",
    "stats_from_uint8",
    "weights_url",
]


class FIDError(ValueError):
    """A user error (missing or corrupt file, too few images, mismatched dims) with an actionable message."""


# --------------------------------------------------------------------------------------------------
# The FID Inception network
# --------------------------------------------------------------------------------------------------


def weights_url() -> str:
    """Where the default weights come from: ``$SAMPLERS_FID_WEIGHTS_URL``, else pytorch-fid's release URL."""
    return os.environ.get(FID_WEIGHTS_URL_ENV) or FID_WEIGHTS_URL


def default_weights_path() -> Path:
    """Where torch.hub (and pytorch-fid) cache the weights: ``torch.hub.get_dir()/checkpoints/<URL's file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights_url()).path).name


def resolve_weights_path(weights: str | Path | None = None, offline: bool | None = None) -> Path:
    """The weights file to load: ``weights`` if given (FIDError if missing), else the verified default file,
    downloaded into the torch hub cache on first use (see :func:`~samplers.evaluation.downloads.fetch_verified`)."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FIDError(
                f"FID Inception weights file not found: {path}. Pass the path of {FID_WEIGHTS_FILENAME} "
                f"(from {FID_WEIGHTS_URL}), or leave the option out to use the cached or downloaded default."
            )
        return path
    what = "pytorch-fid's FID Inception weights"
    return fetch_verified(weights_url(), default_weights_path(), what, offline=is_offline(offline))


def build_fid_inception_without_weights() -> nn.Module:
    """pytorch-fid's ``fid_inception_v3()`` architecture (torchvision Inception3 + TF-FID blocks), no weights.

    Mirrors ``pytorch_fid.inception.fid_inception_v3`` line by line except for its download; the parameters
    are torch's default initialisation and must be replaced by ``load_state_dict``.
    """
    inception = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    inception.Mixed_5b = FIDInceptionA(192, pool_features=32)
    inception.Mixed_5c = FIDInceptionA(256, pool_features=64)
    inception.Mixed_5d = FIDInceptionA(288, pool_features=64)
    inception.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    inception.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    inception.Mixed_7b = FIDInceptionE_1(1280)
    inception.Mixed_7c = FIDInceptionE_2(2048)
    return inception


class FIDInceptionV3(InceptionV3):
    """pytorch-fid's ``InceptionV3`` feature extractor around an already-loaded FID Inception network.

    ``forward`` is pytorch-fid's own (bilinear resize to 299, scale to [-1, 1], blocks up to ``dims``).
    """

    def __init__(self, inception: nn.Module, dims: int = 2048) -> None:
        if dims not in InceptionV3.BLOCK_INDEX_BY_DIM:
            raise FIDError(f"dims must be one of {FID_DIMS}, got {dims}")
        # InceptionV3.__init__ would build (and download) its own network, so only nn.Module's is run and the
        # attributes it sets are assigned here, block for block as in pytorch-fid.
        nn.Module.__init__(self)
        block_index = InceptionV3.BLOCK_INDEX_BY_DIM[dims]
        self.dims = dims
        self.weights_sha256: str | None = None  # set by load_fid_inception: keys the cached reference stats
        self.resize_input = True
        self.normalize_input = True
        self.output_blocks = [block_index]
        self.last_needed_block = block_index
        i = inception
        stages = [
            [i.Conv2d_1a_3x3, i.Conv2d_2a_3x3, i.Conv2d_2b_3x3, nn.MaxPool2d(kernel_size=3, stride=2)],
            [i.Conv2d_3b_1x1, i.Conv2d_4a_3x3, nn.MaxPool2d(kernel_size=3, stride=2)],
            [i.Mixed_5b, i.Mixed_5c, i.Mixed_5d, i.Mixed_6a, i.Mixed_6b, i.Mixed_6c, i.Mixed_6d, i.Mixed_6e],
            [i.Mixed_7a, i.Mixed_7b, i.Mixed_7c, nn.AdaptiveAvgPool2d(output_size=(1, 1))],
        ]
        self.blocks = nn.ModuleList(nn.Sequential(*stage) for stage in stages[: block_index + 1])
        self.requires_grad_(False)
        self.eval()

    @property
    def device(self) -> torch.device:
        """The device the network's parameters live on."""
        return next(self.parameters()).device

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pool features ``(N, dims)`` (float32, on the model's device) of uint8 RGB ``(N, 3, H, W)``."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise FIDError(f"expected uint8 images of shape (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        # Contiguous NCHW like pytorch-fid's ToTensor: a channels-last input (an NHWC array permuted) would
        # select other conv kernels and change the features in the 7th digit.
        x = images.contiguous().to(self.device, non_blocking=True).float().div_(255)
        out = self(x)[0]
        if out.shape[2:] != (1, 1):
            out = F.adaptive_avg_pool2d(out, output_size=(1, 1))
        return out.flatten(1)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    hint = f"re-download {FID_WEIGHTS_URL} and put it at {path}"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any failure to unpickle means the same thing to the user
        raise FIDError(
            f"cannot read FID Inception weights {path}: the file is corrupt or not a PyTorch state dict "
            f"({type(err).__name__}); {hint}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FIDError(f"FID Inception weights {path} hold a {type(state).__name__}, not a state dict; {hint}")
    return state


def _check_state_dict(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path) -> None:
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{len(items)} {what} (e.g. {', '.join(items[:3])})"
        for what, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("wrong shapes", wrong_shape),
        )
        if items
    ]
    if problems:
        raise FIDError(
            f"{path} is not the FID Inception network's state dict: {'; '.join(problems)}. "
            f"Use pytorch-fid's {FID_WEIGHTS_FILENAME} from {FID_WEIGHTS_URL}."
        )


def load_fid_inception(
    weights: str | Path | None = None,
    dims: int = 2048,
    device: str | torch.device | None = None,
    offline: bool | None = None,
) -> FIDInceptionV3:
    """The FID Inception feature extractor for ``dims`` (64, 192, 768 or 2048) with weights from a local file.

    ``weights`` defaults to the torch hub cache, downloaded on first use unless ``offline`` (see
    :func:`resolve_weights_path`); ``device`` to cuda if available. Raises FIDError naming the file if it is
    missing or not the right state dict.
    """
    if dims not in InceptionV3.BLOCK_INDEX_BY_DIM:
        raise FIDError(f"dims must be one of {FID_DIMS}, got {dims}")
    path = resolve_weights_path(weights, offline)
    state = _read_state_dict(path)
    inception = build_fid_inception_without_weights()
    _check_state_dict(state, inception.state_dict(), path)
    inception.load_state_dict(state)
    model = FIDInceptionV3(inception, dims).to(resolve_device(device))
    model.weights_sha256 = file_sha256(path)
    return model


def resolve_device(device: str | torch.device | None, local_rank: int | None = None) -> torch.device:
    """``device`` checked (FIDError if malformed or CUDA is missing); default: ``cuda`` (``cuda:<local_rank>``
    when a launcher's rank is given) when available, else cpu."""
    if device is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda" if local_rank is None else f"cuda:{local_rank}")
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError):
        raise FIDError(f"invalid device {device!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FIDError(f"device {device} requested but CUDA is not available; use --device cpu")
    return device


# --------------------------------------------------------------------------------------------------
# Streaming feature statistics
# --------------------------------------------------------------------------------------------------


class FeatureStats:
    """Streaming float64 mean and covariance of feature vectors (Chan et al.'s parallel update).

    ``update`` takes a batch ``(B, dims)``; ``merge`` folds in another accumulator (a shard from another
    process, e.g. read with :meth:`from_npz`). State lives on ``device`` (the GPU, next to the features).
    """

    def __init__(self, dims: int, device: str | torch.device = "cpu") -> None:
        self.dims = dims
        self.count = 0
        self._mean = torch.zeros(dims, dtype=torch.float64, device=device)
        self._m2 = torch.zeros(dims, dims, dtype=torch.float64, device=device)

    def _combine(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        total = self.count + count
        delta = mean - self._mean
        self._mean += delta * (count / total)
        self._m2 += m2
        self._m2.addr_(delta, delta, alpha=self.count * count / total)
        self.count = total

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        """Add a batch of feature vectors ``(B, dims)``."""
        x = torch.as_tensor(features).to(self._mean.device, torch.float64)
        if x.ndim != 2 or x.shape[1] != self.dims:
            raise FIDError(f"expected features of shape (B, {self.dims}), got {tuple(x.shape)}")
        if len(x) == 0:
            return
        mean = x.mean(0)
        centred = x - mean
        self._combine(len(x), mean, centred.T @ centred)

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Fold ``other`` (same dims) into this accumulator; returns ``self``."""
        if other.dims != self.dims:
            raise FIDError(f"cannot merge feature stats of {other.dims} dims into {self.dims} dims")
        if other.count:
            device = self._mean.device
            self._combine(other.count, other._mean.to(device), other._m2.to(device))
        return self

    def mean(self) -> np.ndarray:
        """The mean feature vector ``(dims,)``, float64."""
        if self.count == 0:
            raise FIDError("no features were accumulated")
        return self._mean.cpu().numpy().copy()

    def cov(self) -> np.ndarray:
        """The unbiased covariance ``(dims, dims)``, like ``np.cov(rowvar=False)``; needs 2+ samples."""
        if self.count < 2:
            raise FIDError(f"at least 2 images are needed to estimate a covariance, got {self.count}")
        return (self._m2 / (self.count - 1)).cpu().numpy()

    def to_npz(self, path: str | Path) -> None:
        """Write a pytorch-fid stats file (``mu``, ``sigma``) plus the sample count ``n`` to ``path``."""
        mu, sigma = self.mean(), self.cov()
        with open(path, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, n=np.int64(self.count))

    @classmethod
    def from_npz(cls, path: str | Path, device: str | torch.device = "cpu") -> FeatureStats:
        """Read a file written by :meth:`to_npz` (it needs ``n`` to be mergeable; see :func:`load_stats`)."""
        mu, sigma = load_stats(path)
        _, arrays = _read_npz(Path(path), ("n",))
        if "n" not in arrays:
            raise FIDError(
                f"{path} has no sample count 'n' (not written by FeatureStats.to_npz), so it cannot be "
                "merged; read its mu/sigma with load_stats()"
            )
        count = int(arrays["n"])
        if count < 2:
            raise FIDError(f"{path}: sample count n={count}, expected at least 2")
        stats = cls(len(mu), device)
        stats.count = count
        stats._mean = torch.as_tensor(mu, dtype=torch.float64, device=device)
        stats._m2 = torch.as_tensor(sigma * (count - 1), dtype=torch.float64, device=device)
        return stats


def _read_npz(path: Path, wanted: Iterable[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    """The key list of an ``.npz`` file and the arrays of ``wanted`` that it holds; FIDError if unreadable."""
    try:
        loaded = np.load(path)
    except (OSError, ValueError, EOFError) as err:
        raise FIDError(f"cannot read {path} as an .npz file: {err}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise FIDError(f"{path} holds a single .npy array, not an .npz archive with named arrays")
    with loaded:
        try:
            return sorted(loaded.files), {k: loaded[k] for k in wanted if k in loaded.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise FIDError(f"cannot read {path}: {err}") from None


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` from a pytorch-fid stats ``.npz``, validated (keys, 1-D mu, square sigma, finite)."""
    path = Path(path)
    if not path.is_file():
        raise FIDError(f"stats file not found: {path}")
    keys, arrays = _read_npz(path, ("mu", "sigma"))
    if len(arrays) != 2:
        raise FIDError(
            f"{path} is not an FID stats file: it has keys {keys}, expected 'mu' and 'sigma' "
            "(pytorch-fid format; write one with --save-stats)"
        )
    mu, sigma = arrays["mu"], arrays["sigma"]
    if mu.ndim != 1 or not np.issubdtype(mu.dtype, np.number):
        raise FIDError(f"{path}: 'mu' must be a 1-D numeric vector, got {mu.dtype} of shape {mu.shape}")
    if sigma.shape != (len(mu), len(mu)) or not np.issubdtype(sigma.dtype, np.number):
        raise FIDError(
            f"{path}: 'sigma' must be a square numeric ({len(mu)}, {len(mu)}) matrix to match 'mu', "
            f"got {sigma.dtype} of shape {sigma.shape}"
        )
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FIDError(f"{path}: 'mu' or 'sigma' holds NaN or inf")
    return mu, sigma


# --------------------------------------------------------------------------------------------------
# Images -> features -> stats
# --------------------------------------------------------------------------------------------------


def samples_to_uint8(samples: torch.Tensor) -> torch.Tensor:
    """Quantise float samples in ``[-1, 1]`` to uint8: ``round((x + 1) * 127.5)`` clamped to 0..255."""
    if not torch.isfinite(samples).all():
        raise ValueError("samples contain NaN or inf")
    return ((samples.float() + 1) * 127.5).round().clamp_(0, 255).to(torch.uint8)


def _rgb_nchw(images: torch.Tensor) -> torch.Tensor:
    if images.ndim == 4 and images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    if images.ndim != 4 or images.shape[1] != 3:
        raise FIDError(f"expected images of shape (N, 3, H, W) or (N, 1, H, W), got {tuple(images.shape)}")
    return images


def _as_batches(data: torch.Tensor | np.ndarray | Iterable, batch_size: int) -> Iterator:
    chunks = [data] if isinstance(data, torch.Tensor | np.ndarray) else data
    for chunk in chunks:
        for start in range(0, len(chunk), batch_size):
            yield chunk[start : start + batch_size]


def _accumulate(batches: Iterable[torch.Tensor], model: FIDInceptionV3, stats: FeatureStats | None) -> FeatureStats:
    stats = FeatureStats(model.dims, model.device) if stats is None else stats
    for batch in batches:
        stats.update(model.features(batch))
    return stats


def stats_from_samples(
    samples: torch.Tensor | Iterable[torch.Tensor],
    model: FIDInceptionV3,
    batch_size: int = 100,
    stats: FeatureStats | None = None,
) -> FeatureStats:
    """Stats of float samples ``(N, C, H, W)`` in ``[-1, 1]`` (C = 3 or 1), or of an iterable of such chunks.

    Samples are uint8-quantised first. Pass ``stats`` to keep accumulating into an existing one.
    """
    batches = (_rgb_nchw(samples_to_uint8(b)) for b in _as_batches(samples, batch_size))
    return _accumulate(batches, model, stats)


def _nhwc_uint8_to_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise FIDError(f"expected uint8 images, got {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise FIDError(f"expected uint8 images of shape (N, H, W, 3) (NHWC), got {tuple(x.shape)}")
    return _rgb_nchw(x.permute(0, 3, 1, 2))


def stats_from_uint8(
    images: np.ndarray | torch.Tensor | Iterable[np.ndarray | torch.Tensor],
    model: FIDInceptionV3,
    batch_size: int = 100,
    stats: FeatureStats | None = None,
) -> FeatureStats:
    """Stats of uint8 images ``(N, H, W, 3)`` (NHWC, as in files; grayscale ``(N, H, W)`` is repeated)."""
    batches = (_nhwc_uint8_to_nchw(b) for b in _as_batches(images, batch_size))
    return _accumulate(batches, model, stats)


def list_image_files(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder`` (pytorch-fid's extensions, any case), sorted."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix[1:].lower() in IMAGE_EXTENSIONS)


def _folder_batches(files: list[Path], batch_size: int) -> Iterator[np.ndarray]:
    from PIL import Image

    for start in range(0, len(files), batch_size):
        arrays = []
        for file in files[start : start + batch_size]:
            try:
                with Image.open(file) as img:
                    arrays.append(np.asarray(img.convert("RGB")))
            except OSError as err:
                raise FIDError(f"cannot read image {file}: {err}") from None
        # Images of different sizes are fed in runs of equal size (InceptionV3 resizes each to 299 anyway).
        run = [arrays[0]]
        for array in arrays[1:]:
            if array.shape != run[0].shape:
                yield np.stack(run)
                run = []
            run.append(array)
        yield np.stack(run)


def _load_cifar10(root: str, train: bool) -> np.ndarray:
    try:
        dataset = torchvision.datasets.CIFAR10(root, train=train, download=False)
    except RuntimeError:
        raise FIDError(
            f"CIFAR-10 not found (or corrupt) under {root}: extract {CIFAR10_URL} there so that "
            f"{Path(root) / 'cifar-10-batches-py'} exists"
        ) from None
    return dataset.data


def cifar10_dir() -> Path:
    """Where CIFAR-10 is downloaded and extracted: ``<cache>/cifar10`` (see
    :func:`~samplers.evaluation.downloads.cache_dir`)."""
    return cache_dir() / "cifar10"


def _cifar10_source() -> tuple[str, str | None]:
    """The archive's URL (``$SAMPLERS_CIFAR10_URL`` or torchvision's) and MD5 (``$SAMPLERS_CIFAR10_MD5``, else
    torchvision's for its own URL, else unchecked)."""
    url = os.environ.get(CIFAR10_URL_ENV) or CIFAR10_URL
    return url, os.environ.get(CIFAR10_MD5_ENV) or (CIFAR10_MD5 if url == CIFAR10_URL else None)


def _cifar10_missing(split: str) -> Missing | None:
    """The offline report's line for CIFAR-10 when ``split`` is neither extracted nor in a verified archive."""
    folder = cifar10_dir() / "cifar-10-batches-py"
    if all((folder / name).is_file() for name in CIFAR10_BATCHES[split]):
        return None
    url, md5 = _cifar10_source()
    archive = cifar10_dir() / Path(urlparse(url).path).name
    if check_integrity(str(archive), md5):  # extracted without any request
        return None
    return Missing("CIFAR-10, python version (163 MiB)", f"{archive} (or its extracted folder {folder})", url)


def cifar10_images(split: str, offline: bool | None = None) -> np.ndarray:
    """CIFAR-10's ``split`` (``train``: 50k, ``test``: 10k) as uint8 ``(N, 32, 32, 3)``, in torchvision's order.

    Downloaded (torchvision's download, MD5-checked) and extracted into :func:`cifar10_dir` on first use.
    """
    folder = cifar10_dir() / "cifar-10-batches-py"
    if not all((folder / name).is_file() for name in CIFAR10_BATCHES[split]):
        missing = _cifar10_missing(split)
        if missing is not None and is_offline(offline):
            raise MissingFiles([missing])
        url, md5 = _cifar10_source()
        archive = cifar10_dir() / Path(urlparse(url).path).name
        say(f"extracting {archive}" if missing is None else f"downloading CIFAR-10 from {url} into {cifar10_dir()}")
        try:
            download_and_extract_archive(url, str(cifar10_dir()), md5=md5)
        except RuntimeError:  # torchvision's "File not found or corrupted." after an MD5 mismatch
            raise DownloadError(
                f"the CIFAR-10 archive downloaded from {url} into {cifar10_dir()} does not have MD5 {md5} "
                "(cut short, or another file); run again to download it again"
            ) from None
        except (OSError, EOFError, ValueError) as err:  # network errors (URLError is an OSError), bad archive
            raise DownloadError(
                f"cannot download or extract CIFAR-10 from {url}: {getattr(err, 'reason', None) or err}. "
                f"{offline_hint(cifar10_dir())}"
            ) from None
        if missing is not None:
            say(f"fetched CIFAR-10 ({human_size(archive.stat().st_size)}) into {archive}, extracted into {folder}")
    arrays = []
    for name in CIFAR10_BATCHES[split]:
        try:
            with open(folder / name, "rb") as f:
                arrays.append(pickle.load(f, encoding="latin1")["data"])
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError) as err:
            raise FIDError(
                f"cannot read CIFAR-10 batch {folder / name} ({err}); delete {folder} to fetch it again"
            ) from None
    return np.vstack(arrays).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def reference_stats_path(name: str, dims: int, weights_sha256: str) -> Path:
    """The cache file of the named reference stats, keyed by data set, split, dims and the weights' SHA-256."""
    return cache_dir() / "fid_stats" / f"{name}-32px-{dims}d-inception-{weights_sha256[:16]}.npz"


def _check_reference_name(name: str) -> str:
    if name not in REFERENCE_STATS:
        raise FIDError(f"unknown reference stats {name!r}; known names: {', '.join(REFERENCE_STATS)}")
    return REFERENCE_STATS[name]


def reference_stats(
    name: str, model: FIDInceptionV3, batch_size: int = 100, offline: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of a named reference (``cifar10-train``: 50k images at 32x32, ``cifar10-test``: 10k).

    Computed once with ``model`` (from the data set, downloaded on first use) and cached as a pytorch-fid
    ``.npz`` under :func:`reference_stats_path`; later calls with the same weights and dims read the cache.
    """
    split = _check_reference_name(name)
    if model.weights_sha256 is None:
        raise FIDError("the Inception model has no weights hash to key the cache; load it with load_fid_inception")
    path = reference_stats_path(name, model.dims, model.weights_sha256)
    if path.is_file():
        say(f"using cached {name} stats {path}")
        return load_stats(path)
    images = cifar10_images(split, offline)
    batches = tqdm(
        _as_batches(images, batch_size), total=-(-len(images) // batch_size), desc=f"{name} stats", unit="batch"
    )
    stats = stats_from_uint8(batches, model, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    stats.to_npz(tmp)
    os.replace(tmp, path)
    say(f"computed {name} stats ({stats.count} images, {model.dims} dims) and cached them at {path}")
    return stats.mean(), stats.cov()


def missing_inputs(weights: str | Path | None, dims: int, names: Iterable[str]) -> list[Missing]:
    """What offline mode lacks for the default Inception weights and the named reference stats (no request)."""
    items: list[Missing] = []
    try:
        weights_path: Path | None = resolve_weights_path(weights, offline=True)
    except MissingFiles as err:
        items += err.items
        weights_path = None
    for name in names:
        split = _check_reference_name(name)
        if weights_path is not None and reference_stats_path(name, dims, file_sha256(weights_path)).is_file():
            continue
        item = _cifar10_missing(split)
        if item is not None and item not in items:
            items.append(item)
    return items


def _open_source(
    path: str | Path, batch_size: int, offline: bool | None = None
) -> tuple[Callable[[], Iterator] | None, tuple | None]:
    """``(batch factory, None)`` for an image source (validated, 2+ images), ``(None, (mu, sigma))`` for stats."""
    spec = str(path)
    if spec in REFERENCE_STATS:
        return partial(_as_batches, cifar10_images(REFERENCE_STATS[spec], offline), batch_size), None
    for prefix, train in CIFAR10_PREFIXES.items():
        if spec.startswith(prefix):
            data = _load_cifar10(spec[len(prefix) :], train)
            return partial(_as_batches, data, batch_size), None
    path = Path(path)
    if path.is_dir():
        files = list_image_files(path)
        if len(files) < 2:
            raise FIDError(
                f"at least 2 images are needed, found {len(files)} in {path} "
                f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        return partial(_folder_batches, files, batch_size), None
    if not path.exists():
        raise FIDError(f"path not found: {path}")
    if path.suffix.lower() != ".npz":
        raise FIDError(f"{path} is neither a folder of images nor an .npz file (stats or images)")
    keys, arrays = _read_npz(path, ("images", "arr_0"))
    if "mu" in keys:
        return None, load_stats(path)
    if not arrays:
        raise FIDError(f"{path} holds neither images ('images' or 'arr_0') nor stats ('mu', 'sigma'); keys: {keys}")
    data = arrays.get("images", arrays.get("arr_0"))
    if len(data) < 2:
        raise FIDError(f"at least 2 images are needed, found {len(data)} in {path}")
    _nhwc_uint8_to_nchw(data[:1])  # dtype and layout errors now, before the network is loaded
    return partial(_as_batches, data, batch_size), None


def stats_from_path(
    path: str | Path, model: FIDInceptionV3, batch_size: int = 100, offline: bool | None = None
) -> FeatureStats:
    """Stats of an image source: a folder of images, an ``.npz`` of uint8 NHWC images (key ``images`` or
    ``arr_0``), ``cifar10:ROOT`` / ``cifar10-test:ROOT`` (torchvision's CIFAR-10, present locally), or
    ``cifar10-train`` / ``cifar10-test`` (CIFAR-10 from the project cache, downloaded on first use)."""
    batches, stats = _open_source(path, batch_size, offline)
    if stats is not None:
        raise FIDError(f"{path} is already a stats file, not images")
    return stats_from_uint8(batches(), model, batch_size)


def fid_from_paths(
    path1: str | Path,
    path2: str | Path,
    *,
    weights: str | Path | None = None,
    dims: int = 2048,
    batch_size: int = 100,
    device: str | torch.device | None = None,
    offline: bool | None = None,
) -> float:
    """FID between two sources, each a stats ``.npz``, a reference name (``cifar10-train``, ``cifar10-test``:
    cached stats, see :func:`reference_stats`) or an image source (see :func:`stats_from_path`).

    Both sources are checked before the network is loaded; it is loaded only if a side needs features.
    Offline, everything missing is reported at once (:class:`~samplers.evaluation.downloads.MissingFiles`) before
    any work.
    """
    paths = (path1, path2)
    names = [str(p) for p in paths if str(p) in REFERENCE_STATS]
    sources = [(None, None) if str(p) in REFERENCE_STATS else _open_source(p, batch_size) for p in paths]
    if is_offline(offline) and any(stats is None for _, stats in sources):  # the network is needed
        require(missing_inputs(weights, dims, names))
    stats_dims = [(p, len(s[1][0])) for p, s in zip(paths, sources, strict=True) if s[1] is not None]
    if len(stats_dims) == 2 and stats_dims[0][1] != stats_dims[1][1]:
        raise FIDError(f"feature dims differ: {path1} has {stats_dims[0][1]}, {path2} has {stats_dims[1][1]}")
    if len(stats_dims) == 1 and stats_dims[0][1] != dims:
        ((path, n),) = stats_dims
        raise FIDError(f"{path} holds {n}-dim stats but features are computed with dims={dims}; use --dims {n}")
    model = None
    moments = []
    for path, (batches, stats) in zip(paths, sources, strict=True):
        if stats is None:
            model = load_fid_inception(weights, dims, device, offline) if model is None else model
            if batches is None:
                stats = reference_stats(str(path), model, batch_size, offline)
            else:
                feature_stats = stats_from_uint8(batches(), model, batch_size)
                stats = (feature_stats.mean(), feature_stats.cov())
        moments.append(stats)
    return frechet_distance(*moments[0], *moments[1])


# --------------------------------------------------------------------------------------------------
# Distances
# --------------------------------------------------------------------------------------------------


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2))`` with pytorch-fid's numerics (float64).

    ``scipy.linalg.sqrtm`` of the product; if not finite, ``eps`` is added to both diagonals; a complex result
    is accepted if its diagonal's imaginary part is within 1e-3 of 0, and its real part is used.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise FIDError(
            f"feature dims differ: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}; "
            "both stats must come from the same --dims"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates",
            stacklevel=2,
        )
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def kernel_inception_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: unbiased MMD^2 with the kernel ``(x.y / d + 1)^3``, mean and std over random subsets.

    Each subset draws ``min(subset_size, n1, n2)`` rows without replacement from each side (as clean-fid and
    torch-fidelity do).
    """
    x_all, y_all = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if x_all.ndim != 2 or y_all.ndim != 2 or x_all.shape[1] != y_all.shape[1]:
        raise FIDError(f"feature shapes differ: {x_all.shape} vs {y_all.shape}")
    m = min(subset_size, len(x_all), len(y_all))
    if m < 2:
        raise FIDError(f"at least 2 feature vectors per side are needed for KID, got {m}")
    d = x_all.shape[1]
    rng = np.random.default_rng(seed)
    mmds = np.empty(num_subsets)
    for i in range(num_subsets):
        x = x_all[rng.choice(len(x_all), m, replace=False)]
        y = y_all[rng.choice(len(y_all), m, replace=False)]
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        mmds[i] = within - 2 * kxy.mean()
    return float(mmds.mean()), float(mmds.std())
