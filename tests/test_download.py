"""fetch_archive against a local HTTP server: caching, checksums, mirrors, leftovers and unsafe archives."""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import socket
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import LocalServer

from histoflow.data.download import DownloadError, fetch_archive, parse_checksum

FILES = {"data/a/1.txt": b"one", "data/b/2.txt": b"two"}


def make_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def closed_port_url() -> str:
    """A URL on a port nothing listens on: the connection is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/x.tar.gz"


def assert_unpacked(root: Path) -> None:
    for name, data in FILES.items():
        assert (root / name).read_bytes() == data


def test_tar_gz_is_fetched_once_then_served_from_cache(http_server: LocalServer, tmp_path: Path) -> None:
    archive = make_tar(http_server.root / "set.tar.gz", FILES)
    url = f"{http_server.url}/set.tar.gz"
    cache = tmp_path / "cache"

    first = fetch_archive([url], sha256(archive), cache)
    assert first == cache.resolve() / "set"
    assert_unpacked(first)
    assert http_server.requests == ["/set.tar.gz"]
    assert not list(cache.glob("*.part")) and not (cache / "set.unpacking").exists()

    (first / "sentinel").touch()  # survives only if the second call neither re-downloads nor re-unpacks
    second = fetch_archive([url], sha256(archive), cache)
    assert second == first
    assert (second / "sentinel").exists()
    assert len(http_server.requests) == 1


def test_zip_with_md5_and_sha1(http_server: LocalServer, tmp_path: Path) -> None:
    archive = make_zip(http_server.root / "set.zip", FILES)
    data = archive.read_bytes()
    url = f"{http_server.url}/set.zip"
    out = fetch_archive([url], "md5:" + hashlib.md5(data).hexdigest(), tmp_path / "c1")
    assert_unpacked(out)
    out = fetch_archive([url], "SHA1:" + hashlib.sha1(data).hexdigest().upper(), tmp_path / "c2", name="mine")
    assert out.name == "mine"
    assert_unpacked(out)


def test_mirrors_tried_in_order_after_404_and_bad_checksum(http_server: LocalServer, tmp_path: Path) -> None:
    good = make_tar(http_server.root / "good.tar.gz", FILES)
    make_tar(http_server.root / "tampered.tar.gz", {"data/a/1.txt": b"evil"})
    urls = [f"{http_server.url}/missing.tar.gz", f"{http_server.url}/tampered.tar.gz", f"{http_server.url}/good.tar.gz"]

    out = fetch_archive(urls, sha256(good), tmp_path / "cache", name="set")
    assert_unpacked(out)
    assert http_server.requests == ["/missing.tar.gz", "/tampered.tar.gz", "/good.tar.gz"]


def test_checksum_mismatch_everywhere_fails_and_leaves_nothing(http_server: LocalServer, tmp_path: Path) -> None:
    make_tar(http_server.root / "set.tar.gz", FILES)
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        fetch_archive([f"{http_server.url}/set.tar.gz"], "sha256:" + "0" * 64, cache)
    assert sorted(p.name for p in cache.iterdir()) == ["set.lock"]  # no .part, archive or folder kept


def test_all_urls_failing_names_every_url_and_the_fix(http_server: LocalServer, tmp_path: Path) -> None:
    urls = [f"{http_server.url}/missing.tar.gz", closed_port_url(), (tmp_path / "nowhere.tar.gz").as_uri()]
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError) as info:
        fetch_archive(urls, None, cache, name="set")
    message = str(info.value)
    for url in urls:
        assert url in message
    assert "HTTP 404" in message
    assert "data.root=<unpacked folder>" in message
    assert str(cache.resolve() / "set.tar.gz") in message
    assert isinstance(info.value, RuntimeError) and len(info.value.failures) == 3


def test_archive_put_by_hand_at_the_printed_path_is_used(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "set.tar.gz", FILES)
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError) as info:
        fetch_archive([closed_port_url()], sha256(archive), cache, name="set")
    shutil.copy(archive, info.value.archive)
    assert_unpacked(fetch_archive([closed_port_url()], sha256(archive), cache, name="set"))


def test_local_path_and_file_url(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "set.zip", FILES)
    assert_unpacked(fetch_archive([str(archive)], sha256(archive), tmp_path / "c1"))
    assert_unpacked(fetch_archive([archive.as_uri()], sha256(archive), tmp_path / "c2"))


def test_interrupted_leftovers_are_discarded(http_server: LocalServer, tmp_path: Path) -> None:
    archive = make_tar(http_server.root / "set.tar.gz", FILES)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "set.tar.gz.part").write_bytes(b"half a download")
    (cache / "set").mkdir()  # renamed into place but the marker never written
    (cache / "set" / "stale.txt").write_text("old")
    (cache / "set.unpacking").mkdir()
    (cache / "set.unpacking" / "half.txt").write_text("half")

    out = fetch_archive([f"{http_server.url}/set.tar.gz"], sha256(archive), cache)
    assert_unpacked(out)
    assert not (out / "stale.txt").exists()
    assert not (cache / "set.tar.gz.part").exists() and not (cache / "set.unpacking").exists()
    assert http_server.requests == ["/set.tar.gz"]


def test_changed_checksum_refetches(http_server: LocalServer, tmp_path: Path) -> None:
    old = make_tar(http_server.root / "set.tar.gz", FILES)
    old_sum = sha256(old)
    url = f"{http_server.url}/set.tar.gz"
    fetch_archive([url], old_sum, tmp_path / "cache")
    new = make_tar(http_server.root / "set.tar.gz", {"data/a/1.txt": b"new"})
    out = fetch_archive([url], sha256(new), tmp_path / "cache")
    assert (out / "data/a/1.txt").read_bytes() == b"new"
    assert len(http_server.requests) == 2


def test_unverified_archive_from_another_url_is_not_reused(http_server: LocalServer, tmp_path: Path) -> None:
    make_tar(http_server.root / "set.tar.gz", FILES)
    (http_server.root / "v2").mkdir()
    make_tar(http_server.root / "v2" / "set.tar.gz", {"data/a/1.txt": b"v2"})
    fetch_archive([f"{http_server.url}/set.tar.gz"], None, tmp_path / "cache")
    out = fetch_archive([f"{http_server.url}/v2/set.tar.gz"], None, tmp_path / "cache")
    assert (out / "data/a/1.txt").read_bytes() == b"v2"


@pytest.mark.parametrize("tar_filters", [True, False], ids=["data-filter", "old-python-fallback"])
def test_malicious_tar_member_is_not_written_outside(
    http_server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tar_filters: bool
) -> None:
    if not tar_filters:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    make_tar(http_server.root / "evil.tar", {"data/a/1.txt": b"ok", "../../escaped.txt": b"pwned"})
    with pytest.raises(DownloadError, match="outside|unsafe"):
        fetch_archive([f"{http_server.url}/evil.tar"], None, tmp_path / "cache")
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (tmp_path / "cache" / "evil").exists()


def test_malicious_zip_member_is_not_written_outside(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "evil.zip", {"../../escaped.txt": b"pwned"})
    with pytest.raises(DownloadError, match="unsafe path"):
        fetch_archive([str(archive)], None, tmp_path / "deep" / "cache")
    assert not list(tmp_path.rglob("escaped.txt"))


def test_not_an_archive_is_rejected(http_server: LocalServer, tmp_path: Path) -> None:
    (http_server.root / "set.tar.gz").write_text("<html>please log in</html>")
    with pytest.raises(DownloadError, match="not a zip or tar"):
        fetch_archive([f"{http_server.url}/set.tar.gz"], None, tmp_path / "cache")


def test_missing_checksum_warns_with_the_digest_to_pin(
    http_server: LocalServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    archive = make_tar(http_server.root / "set.tar.gz", FILES)
    with caplog.at_level(logging.WARNING, logger="histoflow.data.download"):
        fetch_archive([f"{http_server.url}/set.tar.gz"], None, tmp_path / "cache")
    assert "not verified" in caplog.text
    assert sha256(archive) in caplog.text


@pytest.mark.parametrize("bad", ["sha256", "crc32:abcd", "sha256:", "deadbeef"])
def test_malformed_checksum_is_a_config_error(bad: str) -> None:
    with pytest.raises(ValueError, match="data.checksum"):
        parse_checksum(bad)
