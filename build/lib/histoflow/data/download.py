"""Fetch a dataset archive once into a cache, verify it, and unpack it safely.

Cache layout for an archive named `NAME` (by default the primary URL's file name without its suffix):

- `NAME.tar.gz` (or `.zip`, ...): the verified archive, kept so a damaged unpack needs no new download
- `NAME/`: the unpacked archive, which `fetch_archive` returns (callers append any sub-folder)
- `NAME.complete`: written last; while it exists and matches, no request is made at all
- `NAME.tar.gz.part`, `NAME.unpacking/`: in-progress work, discarded when left by an interrupted run
- `NAME.lock`: held while fetching, so parallel jobs sharing the cache download only once

Not pooch (1.9): its Untar extracts without tarfile's "data" filter before Python 3.12, so a
`../` member lands outside the cache (tried: it does on 3.11); it fetches no file:// URL or local path, tries one
URL (no mirrors), reuses an unverified file fetched from another URL, holds no lock across jobs, and draws its bar
with tqdm beside rich's. All of this module but `_download` and `file_digest` would stay, so it stays whole.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from filelock import FileLock

from histoflow.common.errors import ConfigError, HistoflowError
from histoflow.common.progress import progress_bar

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar", ".zip")
HASHES = ("md5", "sha1", "sha256", "sha512")
TIMEOUT_S = 60.0  # per socket operation: a stalled server fails this URL instead of hanging the run
CHUNK = 1 << 20


class DownloadError(HistoflowError, RuntimeError):
    """Every URL failed; the message lists each URL with its reason and how to supply the archive by hand."""

    def __init__(self, name: str, failures: list[tuple[str, str]], archive: Path):
        self.failures = failures
        self.archive = archive
        lines = [f"could not fetch the dataset archive '{name}' from any of {len(failures)} URL(s):"]
        lines += [f"  - {url}: {reason}" for url, reason in failures]
        lines += [
            "Fix: download the archive by hand, then either",
            f"  - put it at {archive} (it is verified and unpacked on the next run), or",
            "  - unpack it yourself and set data.root=<unpacked folder>.",
        ]
        super().__init__("\n".join(lines))


def fetch_archive(urls: list[str], checksum: str | None, cache_dir: str | Path, name: str | None = None) -> Path:
    """Download (first working URL), verify and unpack an archive once; return the unpacked directory."""
    if not urls and name is None:
        raise ValueError("fetch_archive needs at least one URL or a name")
    algo, expected = parse_checksum(checksum)
    cache = Path(cache_dir).expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    suffix = _archive_suffix(urls[0]) if urls else ""
    name = name or _basename(urls[0])[: -len(suffix) or None] or "archive"
    archive = cache / f"{name}{suffix or '.archive'}"  # a suffix keeps the archive apart from the folder
    target = cache / name
    marker = cache / f"{name}.complete"
    stamp = {"checksum": checksum, "url": None if checksum else (urls[0] if urls else None)}

    if _is_complete(marker, target, stamp):  # fast path: no lock, no hashing, no request
        return target
    with FileLock(str(cache / f"{name}.lock")):
        if _is_complete(marker, target, stamp):  # another job finished while we waited
            return target
        if marker.exists():  # finished for another checksum or URL: its archive is not ours either
            archive.unlink(missing_ok=True)
            marker.unlink()
        # whatever else is here was left by an interrupted run: redo it
        part = archive.with_name(archive.name + ".part")
        tmp = cache / f"{name}.unpacking"
        for leftover in (target, tmp):
            shutil.rmtree(leftover, ignore_errors=True)
        part.unlink(missing_ok=True)

        failures: list[tuple[str, str]] = []
        if archive.is_file():  # a complete earlier download, or an archive the user put here by hand
            try:
                _verify(archive, algo, expected)
                _unpack(archive, tmp)
            except (OSError, ValueError, tarfile.TarError, zipfile.BadZipFile) as err:
                log.warning("discarding cached archive %s: %s", archive, err)
                archive.unlink(missing_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
        for url in urls:
            if tmp.is_dir():
                break
            try:
                digest = _download(url, part, algo or "sha256", archive.name)
                if expected and digest != expected:
                    raise ValueError(f"{algo} mismatch: expected {expected}, got {digest}")
                part.replace(archive)  # only a complete, verified download gets the archive's name
                if not expected:
                    log.warning("archive %s is not verified (no checksum given); to pin it set "
                                "data.checksum=sha256:%s", archive.name, digest)
                _unpack(archive, tmp)
            except (OSError, ValueError, tarfile.TarError, zipfile.BadZipFile, http.client.HTTPException) as err:
                failures.append((url, _reason(err)))
                log.warning("fetching %s failed: %s", url, _reason(err))
                part.unlink(missing_ok=True)
                archive.unlink(missing_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
        if not tmp.is_dir():
            raise DownloadError(name, failures, archive)
        tmp.rename(target)
        marker.write_text(json.dumps(stamp))  # last: its presence means everything before it is done
    return target


def parse_checksum(checksum: str | None) -> tuple[str | None, str | None]:
    """Split "sha256:<hex>" into ("sha256", "<hex>"); (None, None) when no checksum is given."""
    if not checksum:
        return None, None
    algo, _, digest = checksum.partition(":")
    algo = algo.strip().lower()
    if algo not in HASHES or not digest.strip():
        raise ConfigError(f"data.checksum={checksum!r}: expected '<algorithm>:<hex digest>' "
                         f"with algorithm one of {', '.join(HASHES)}")
    return algo, digest.strip().lower()


def file_digest(path: Path, algo: str = "sha256") -> str:
    """Hex digest of a file, read in chunks."""
    hasher = hashlib.new(algo, usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def _is_complete(marker: Path, target: Path, stamp: dict[str, str | None]) -> bool:
    """The marker exists, was written for the same checksum (or same URL when unverified), and the folder exists."""
    try:
        return target.is_dir() and json.loads(marker.read_text()) == stamp
    except (OSError, ValueError):
        return False


def _basename(url: str) -> str:
    return PurePosixPath(unquote(urlparse(url).path)).name if "://" in url else Path(url).name


def _archive_suffix(url: str) -> str:
    base = _basename(url).lower()
    return next((s for s in ARCHIVE_SUFFIXES if base.endswith(s)), "")


def _as_url(url: str) -> str:
    """Plain local paths become file:// URLs so one code path opens everything."""
    if urlparse(url).scheme in ("http", "https", "ftp", "file"):
        return url
    return Path(url).expanduser().resolve().as_uri()


def _download(url: str, part: Path, algo: str, label: str) -> str:
    """Stream the URL into `part` with a progress bar; return the hex digest of what was written."""
    hasher = hashlib.new(algo, usedforsecurity=False)
    request = urllib.request.Request(_as_url(url), headers={"User-Agent": "histoflow"})
    received = 0
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, open(part, "wb") as out:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with progress_bar(download=True) as progress:
            task = progress.add_task(label, total=total)
            while chunk := response.read(CHUNK):
                out.write(chunk)
                hasher.update(chunk)
                received += len(chunk)
                progress.update(task, advance=len(chunk))
    if total is not None and received != total:
        raise ValueError(f"incomplete download: got {received} of {total} bytes")
    log.info("downloaded %s (%.1f MB) from %s", label, received / 1e6, url)
    return hasher.hexdigest()


def _verify(path: Path, algo: str | None, expected: str | None) -> None:
    if algo and expected and (digest := file_digest(path, algo)) != expected:
        raise ValueError(f"{algo} mismatch: expected {expected}, got {digest}")


def _unpack(archive: Path, dest: Path) -> None:
    """Unpack a zip or tar (any compression) into `dest`, refusing members that would land outside it."""
    dest.mkdir(parents=True)
    root = dest.resolve()
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                if not (root / member).resolve().is_relative_to(root):
                    raise ValueError(f"unsafe path in zip archive: {member!r}")
            zf.extractall(dest)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            if hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+, 3.12
                tf.extractall(dest, filter="data")
            else:
                tf.extractall(dest, members=_safe_members(tf, root))
    else:
        raise ValueError("not a zip or tar archive (a login or error page instead of the file?)")


def _safe_members(tf: tarfile.TarFile, root: Path) -> list[tarfile.TarInfo]:
    """Fallback for Pythons without tar filters: refuse paths and links leaving `root`, and device files."""
    for m in tf.getmembers():
        inside = (root / m.name).resolve().is_relative_to(root)
        if m.issym():
            inside = inside and (root / m.name).parent.joinpath(m.linkname).resolve().is_relative_to(root)
        elif m.islnk():
            inside = inside and (root / m.linkname).resolve().is_relative_to(root)
        if not inside or m.isdev():
            raise ValueError(f"unsafe member in tar archive: {m.name!r}")
    return tf.getmembers()


def _reason(err: BaseException) -> str:
    """A short, human-readable reason for one failed URL."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    return str(err) or type(err).__name__
