"""Files fetched on first use: verified downloads into caches, and an offline mode that names what is missing.

* :func:`fetch_verified` downloads a file with ``torch.hub.download_url_to_file`` (progress bar, temp file moved
  into place only when complete) and checks its SHA-256 against the hex part of the URL's file name, torch.hub's
  ``check_hash`` convention (``name-<sha256 prefix>.ext``). A cached file with the wrong hash (truncated, edited)
  is downloaded again; a download with the wrong hash is retried once, then refused.
* Offline mode (``offline=True``, the scripts' ``--offline``, or ``HF_HUB_OFFLINE=1``) makes no request at all:
  whatever is missing is reported as :class:`Missing` items, all of them in one :class:`MissingFiles` error.
* The project's own cache (CIFAR-10, reference statistics) lives in :func:`cache_dir`.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

OFFLINE_ENV = "HF_HUB_OFFLINE"
CACHE_ENV = "SAMPLERS_CACHE"
_TRUE = {"1", "true", "yes", "on"}
_HASH_CACHE: dict[tuple[str, int, int], str] = {}

__all__ = [
    "DownloadError",
    "Missing",
    "MissingFiles",
    "cache_dir",
    "fetch_verified",
    "file_sha256",
    "human_size",
    "is_offline",
    "offline_hint",
    "require",
    "say",
    "url_hash_prefix",
]


class DownloadError(ValueError):
    """A download failed or gave the wrong file; the message names the file and what to do."""


@dataclass(frozen=True)
class Missing:
    """A file (or folder) that offline mode needs but does not have: what it is, where it goes, where from."""

    what: str
    where: str
    source: str

    def line(self) -> str:
        """One line of the offline report."""
        return f"  - {self.what}: put it at {self.where} (from {self.source})"


class MissingFiles(DownloadError):
    """Offline mode found files missing; ``items`` lists every one of them."""

    def __init__(self, items: list[Missing]) -> None:
        self.items = list(items)
        lines = "\n".join(item.line() for item in self.items)
        super().__init__(
            f"offline mode (--offline or {OFFLINE_ENV}=1) downloads nothing, and {len(self.items)} needed "
            f"file(s) are missing:\n{lines}\nCopy them there from a machine with network access, or run "
            "without --offline (and without HF_HUB_OFFLINE=1) to download them on first use."
        )


def require(items: list[Missing | None]) -> None:
    """Raise one :class:`MissingFiles` naming every missing item (``None`` entries are present files)."""
    missing = [item for item in items if item is not None]
    if missing:
        raise MissingFiles(missing)


def is_offline(offline: bool | None = None) -> bool:
    """``offline`` if given, else whether ``HF_HUB_OFFLINE`` is 1/true/yes/on (huggingface_hub's rule)."""
    if offline is not None:
        return offline
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in _TRUE


def offline_hint(where: str | Path) -> str:
    """The sentence appended to a failed download: how to work on a machine without network access."""
    return (
        f"If this machine has no network access, copy it to {where} from one that has, and run with "
        f"--offline (or {OFFLINE_ENV}=1)."
    )


def cache_dir() -> Path:
    """The project's cache: ``$SAMPLERS_CACHE``, else ``$XDG_CACHE_HOME/samplers``, else ``~/.cache/samplers``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "samplers"


def say(message: str) -> None:
    """Tell the user what was fetched or cached (stderr, next to the progress bars)."""
    print(message, file=sys.stderr, flush=True)


def human_size(num_bytes: int) -> str:
    """``91.2 MiB`` style (binary units, as torch.hub's progress bar counts)."""
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.2f} GiB"


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file (remembered per path, size and modification time: a file is hashed once)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASH_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        _HASH_CACHE[key] = digest.hexdigest()
    return _HASH_CACHE[key]


def url_hash_prefix(url: str) -> str:
    """The SHA-256 prefix in the URL's file name (``name-<hex>.ext``); DownloadError if it has none."""
    name = Path(urlparse(url).path).name
    match = torch.hub.HASH_REGEX.search(name)
    if match is None or not match.group(1):
        raise DownloadError(
            f"cannot verify downloads from {url}: its file name {name!r} carries no SHA-256 prefix "
            "(torch.hub's convention is name-<hex digits of the SHA-256>.ext)"
        )
    return match.group(1)


def fetch_verified(url: str, dest: Path, what: str, *, offline: bool) -> Path:
    """``dest`` if it holds the file with the URL's hash, else the file downloaded from ``url`` into ``dest``.

    A cached file with the wrong hash is replaced; a download with the wrong hash (or cut short) is retried once,
    then refused with DownloadError. Offline, a missing or wrong file raises :class:`MissingFiles` instead.
    """
    prefix = url_hash_prefix(url)
    if dest.is_file():
        digest = file_sha256(dest)
        if digest.startswith(prefix):
            return dest
        say(
            f"{what} at {dest} has SHA-256 {digest[:12]}..., expected {prefix}...: the file is truncated or "
            "not the right one" + ("" if offline else "; downloading it again")
        )
    if offline:
        raise MissingFiles([Missing(f"{what} (SHA-256 starting {prefix})", str(dest), url)])
    dest.parent.mkdir(parents=True, exist_ok=True)
    say(f"downloading {what} from {url} to {dest}")
    for attempt in (1, 2):
        try:
            torch.hub.download_url_to_file(url, str(dest), hash_prefix=prefix, progress=True)
            break
        except (RuntimeError, http.client.IncompleteRead) as err:  # wrong hash, or the transfer was cut short
            problem = str(err) if isinstance(err, RuntimeError) else "the transfer was cut short"
            if attempt == 2:
                raise DownloadError(
                    f"downloaded {what} from {url} twice and got the wrong file both times ({problem}); nothing "
                    f"was saved. Get the file whose SHA-256 starts with {prefix} and put it at {dest}, or point "
                    "the download at a mirror that serves it."
                ) from None
            say(f"the download of {what} is not the expected file ({problem}); downloading it once more")
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", None) or err
            raise DownloadError(f"cannot download {what} from {url}: {reason}. {offline_hint(dest)}") from None
    say(f"fetched {what} ({human_size(dest.stat().st_size)}) into {dest}")
    return dest
