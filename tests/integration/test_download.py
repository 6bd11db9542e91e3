"""`data.download` and `fmnist data --download` against a local HTTP mirror, never the internet.

The mirror is http.server on 127.0.0.1 (port 0) in a thread, serving a tmp copy of Debian's real
.gz files. It records every request (path and Range header) and can be told to honour or ignore
Range, cut a response short, stall, or send a Content-Range from the wrong offset.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fmnist import data
from fmnist.cli import app
from fmnist.config import DataConfig
from fmnist.errors import DataError

NAMES = list(data.IDX_FILES.values())
SMALL = "t10k-labels-idx1-ubyte"  # 5 KB compressed
MEDIUM = "t10k-images-idx3-ubyte"  # 4.4 MB compressed

pytestmark = pytest.mark.usefixtures("clean_env")


@dataclass
class Mirror:
    url: str
    files: dict[str, bytes]  # file name -> bytes served
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range)
    ranges: bool = True  # honour Range with 206 / 416
    wrong_range_start: bool = False  # answer a Range request with bytes from 0
    cut: dict[str, int] = field(default_factory=dict)  # name -> bytes sent before hanging up once
    stall: threading.Event | None = None  # wait for this before answering

    def ranges_asked(self, name: str) -> list[str | None]:
        return [r for path, r in self.requests if path.endswith(f"/{name}.gz")]


class MirrorHandler(BaseHTTPRequestHandler):
    server: MirrorServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        mirror = self.server.mirror
        name = self.path.rsplit("/", 1)[-1].removesuffix(".gz")
        asked = self.headers.get("Range")
        mirror.requests.append((self.path, asked))
        if mirror.stall is not None:
            mirror.stall.wait(timeout=30)
        body = mirror.files.get(name)
        if body is None or self.path != f"/mirror/{name}.gz":
            self.send_error(404)
            return
        start = 0
        if asked and mirror.ranges:
            start = int(re.fullmatch(r"bytes=(\d+)-", asked)[1])  # type: ignore[index]
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            first = 0 if mirror.wrong_range_start else start
            self.send_header("Content-Range", f"bytes {first}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        cut = mirror.cut.pop(name, None)
        self.wfile.write(payload if cut is None else payload[:cut])

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class MirrorServer(ThreadingHTTPServer):
    daemon_threads = True
    mirror: Mirror

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that timed out and hung up is part of the test, not noise


@pytest.fixture(scope="session")
def served_copy(tmp_path_factory: pytest.TempPathFactory, real_data_dir: Path) -> Path:
    """A tmp copy of Debian's four .gz files: what the mirror serves and what we compare with."""
    copy = tmp_path_factory.mktemp("served")
    for name in NAMES:
        shutil.copyfile(real_data_dir / f"{name}.gz", copy / f"{name}.gz")
    return copy


@pytest.fixture
def mirror(served_copy: Path) -> Iterator[Mirror]:
    files = {name: (served_copy / f"{name}.gz").read_bytes() for name in NAMES}
    server = MirrorServer(("127.0.0.1", 0), MirrorHandler)
    server.mirror = Mirror(f"http://127.0.0.1:{server.server_address[1]}/mirror/", files)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                              daemon=True)
    thread.start()
    yield server.mirror
    if server.mirror.stall is not None:
        server.mirror.stall.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture
def target(tmp_path: Path) -> Path:
    return tmp_path / "download"


def place_all_but(target: Path, served_copy: Path, keep: str) -> None:
    """Put every file except ``keep`` in place already, so a test downloads just that one."""
    target.mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        if name != keep:
            (target / f"{name}.gz").symlink_to(served_copy / f"{name}.gz")


def parts(target: Path) -> list[Path]:
    return sorted(target.glob("*.part"))


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int | None]] = []

    def __call__(self, name: str, done: int, total: int | None) -> None:
        self.calls.append((name, done, total))

    def of(self, name: str) -> list[tuple[int, int | None]]:
        return [(done, total) for n, done, total in self.calls if n == f"{name}.gz"]


# --- the happy path ------------------------------------------------------------------------


def test_download_fetches_verifies_and_renames_all_four(mirror: Mirror, target: Path,
                                                        served_copy: Path) -> None:
    progress = Recorder()
    data.download(mirror.url, target, timeout_s=10, progress=progress)
    assert sorted(p.name for p in target.iterdir()) == sorted(f"{n}.gz" for n in NAMES)
    for name in NAMES:
        assert (target / f"{name}.gz").read_bytes() == mirror.files[name]
        calls = progress.of(name)
        dones = [done for done, _ in calls]
        assert dones == sorted(set(dones)), f"{name}: byte counts must grow"
        assert dones[-1] == len(mirror.files[name])
        assert {total for _, total in calls} == {len(mirror.files[name])}
    assert len(progress.of("train-images-idx3-ubyte")) > 100  # 26 MB in 64 KB chunks
    assert sorted(mirror.requests) == sorted((f"/mirror/{n}.gz", None) for n in NAMES)
    loaded = data.load_split("test", data.Source(target, "idx"))
    assert np.bincount(loaded.labels).tolist() == [1000] * 10

    data.download(mirror.url, target, timeout_s=10)  # everything in place: nothing to fetch
    assert len(mirror.requests) == 4


def test_mirror_url_without_trailing_slash(mirror: Mirror, target: Path,
                                           served_copy: Path) -> None:
    place_all_but(target, served_copy, SMALL)
    data.download(mirror.url.rstrip("/"), target, timeout_s=10)
    assert mirror.requests == [(f"/mirror/{SMALL}.gz", None)]


# --- resume --------------------------------------------------------------------------------


def test_a_partial_file_is_resumed_with_a_range_request(mirror: Mirror, target: Path,
                                                        served_copy: Path) -> None:
    place_all_but(target, served_copy, MEDIUM)
    body = mirror.files[MEDIUM]
    half = len(body) // 2
    (target / f"{MEDIUM}.gz.part").write_bytes(body[:half])
    progress = Recorder()
    data.download(mirror.url, target, timeout_s=10, progress=progress)
    assert mirror.ranges_asked(MEDIUM) == [f"bytes={half}-"]
    assert (target / f"{MEDIUM}.gz").read_bytes() == body
    assert parts(target) == []
    first_done, total = progress.of(MEDIUM)[0]
    assert half < first_done <= half + (1 << 16) and total == len(body)
    assert progress.of(MEDIUM)[-1] == (len(body), len(body))


def test_a_server_that_ignores_range_still_ends_with_a_correct_file(
        mirror: Mirror, target: Path, served_copy: Path) -> None:
    mirror.ranges = False
    place_all_but(target, served_copy, MEDIUM)
    body = mirror.files[MEDIUM]
    (target / f"{MEDIUM}.gz.part").write_bytes(body[: len(body) // 2])
    progress = Recorder()
    data.download(mirror.url, target, timeout_s=10, progress=progress)
    assert mirror.ranges_asked(MEDIUM) == [f"bytes={len(body) // 2}-"]  # asked, got a 200
    assert (target / f"{MEDIUM}.gz").read_bytes() == body  # rewritten, not appended
    assert progress.of(MEDIUM)[0][0] <= 1 << 16  # counting restarted from zero
    assert parts(target) == []


def test_a_complete_part_file_gets_416_and_is_verified_and_kept(
        mirror: Mirror, target: Path, served_copy: Path) -> None:
    place_all_but(target, served_copy, SMALL)
    body = mirror.files[SMALL]
    (target / f"{SMALL}.gz.part").write_bytes(body)
    data.download(mirror.url, target, timeout_s=10)
    assert mirror.ranges_asked(SMALL) == [f"bytes={len(body)}-"]
    assert (target / f"{SMALL}.gz").read_bytes() == body
    assert parts(target) == []


def test_a_cut_connection_keeps_the_part_and_the_next_run_resumes(
        mirror: Mirror, target: Path, served_copy: Path) -> None:
    place_all_but(target, served_copy, MEDIUM)
    body = mirror.files[MEDIUM]
    mirror.cut[MEDIUM] = 1_000_000
    with pytest.raises(DataError) as info:
        data.download(mirror.url, target, timeout_s=10)
    assert f"stopped after 1000000 of {len(body)} bytes" in info.value.message
    assert "resume" in info.value.hint
    assert (target / f"{MEDIUM}.gz.part").stat().st_size == 1_000_000
    assert not (target / f"{MEDIUM}.gz").exists()

    data.download(mirror.url, target, timeout_s=10)
    assert mirror.ranges_asked(MEDIUM) == [None, "bytes=1000000-"]
    assert (target / f"{MEDIUM}.gz").read_bytes() == body
    assert parts(target) == []


def test_a_part_that_does_not_resume_to_a_valid_file_is_deleted(
        mirror: Mirror, target: Path, served_copy: Path) -> None:
    place_all_but(target, served_copy, SMALL)
    (target / f"{SMALL}.gz.part").write_bytes(b"not the start of the file")
    with pytest.raises(DataError, match="is not a readable gzip file"):
        data.download(mirror.url, target, timeout_s=10)
    assert parts(target) == [] and not (target / f"{SMALL}.gz").exists()
    data.download(mirror.url, target, timeout_s=10)  # the next run starts clean
    assert (target / f"{SMALL}.gz").read_bytes() == mirror.files[SMALL]


def test_a_206_from_the_wrong_offset_deletes_the_part(mirror: Mirror, target: Path,
                                                      served_copy: Path) -> None:
    mirror.wrong_range_start = True
    place_all_but(target, served_copy, SMALL)
    (target / f"{SMALL}.gz.part").write_bytes(mirror.files[SMALL][:100])
    with pytest.raises(DataError, match="asked to resume at byte 100, the server answered from "
                                        "byte 0"):
        data.download(mirror.url, target, timeout_s=10)
    assert parts(target) == [] and not (target / f"{SMALL}.gz").exists()


# --- failures ------------------------------------------------------------------------------


def test_a_corrupt_file_fails_its_checksum_and_leaves_nothing(mirror: Mirror, target: Path,
                                                              served_copy: Path) -> None:
    place_all_but(target, served_copy, SMALL)
    wrong = bytes([0, 0, 8, 1]) + (10000).to_bytes(4, "big") + bytes(10000)  # valid IDX, all 0
    mirror.files[SMALL] = gzip.compress(wrong)
    with pytest.raises(DataError) as info:
        data.download(mirror.url, target, timeout_s=10)
    assert f"{mirror.url}{SMALL}.gz fails its SHA-256 check" in info.value.message
    assert not (target / f"{SMALL}.gz").exists()
    assert parts(target) == []


def test_a_non_gzip_file_is_a_data_error_and_leaves_nothing(mirror: Mirror, target: Path,
                                                            served_copy: Path) -> None:
    place_all_but(target, served_copy, SMALL)
    mirror.files[SMALL] = b"<html>Access denied</html>"
    with pytest.raises(DataError, match="is not a readable gzip file"):
        data.download(mirror.url, target, timeout_s=10)
    assert not (target / f"{SMALL}.gz").exists() and parts(target) == []


def test_http_404_names_the_url(mirror: Mirror, target: Path) -> None:
    wrong_url = mirror.url.replace("/mirror/", "/elsewhere/")
    with pytest.raises(DataError) as info:
        data.download(wrong_url, target, timeout_s=10)
    first = data.IDX_FILES[("train", "images")]
    assert info.value.message == f"Download of {wrong_url}{first}.gz failed: HTTP 404 Not Found."
    assert "FMNIST_DATA__MIRROR_URL" in info.value.hint
    assert list(target.iterdir()) == []


def test_a_stalled_server_times_out(mirror: Mirror, target: Path, served_copy: Path) -> None:
    place_all_but(target, served_copy, SMALL)
    mirror.stall = threading.Event()
    started = time.monotonic()
    with pytest.raises(DataError, match="timed out"):
        data.download(mirror.url, target, timeout_s=0.3)
    assert time.monotonic() - started < 5
    assert not (target / f"{SMALL}.gz").exists()


def test_a_refused_connection_is_a_data_error(target: Path) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DataError, match=f"Download of http://127.0.0.1:{port}/.* failed"):
        data.download(f"http://127.0.0.1:{port}/", target, timeout_s=5)


# --- through locate() and the CLI ----------------------------------------------------------


def test_locate_downloads_into_data_dir_when_nothing_is_found(
        mirror: Mirror, tmp_path: Path, fmnist_home: Path,
        clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setattr(data, "DEBIAN_DIR", tmp_path / "no-debian")
    cfg = DataConfig(data_dir=tmp_path / "mine", download=True, mirror_url=mirror.url,
                     download_timeout_s=10)
    assert data.locate(cfg) == data.Source(tmp_path / "mine", "idx")
    assert len(mirror.requests) == 4
    assert data.find(cfg) == data.Source(tmp_path / "mine", "idx")


def test_cli_data_download(mirror: Mirror, tmp_path: Path, fmnist_home: Path) -> None:
    result = CliRunner().invoke(app, ["data", "--download", "--json"], env={
        "FMNIST_DATA__MIRROR_URL": mirror.url,
        "FMNIST_DATA__DATA_DIR": str(tmp_path / "fetched"),
        "FMNIST_DATA__DOWNLOAD_TIMEOUT_S": "10",
    })
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["source"] == str((tmp_path / "fetched").resolve())
    assert info["train"]["images"] == 60000 and info["test"]["images"] == 10000
    assert set(info["test"]["per_class"].values()) == {1000}
    assert info["train"]["sha256"] == {n: data.IDX_SHA256[n] for n in
                                       ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")}
    assert sorted(p.name for p in (tmp_path / "fetched").iterdir()) == sorted(
        f"{n}.gz" for n in NAMES)
    assert len(mirror.requests) == 4


def test_cli_data_download_from_a_bad_mirror_is_exit_3(mirror: Mirror, tmp_path: Path,
                                                       fmnist_home: Path) -> None:
    result = CliRunner().invoke(app, ["data", "--download"], env={
        "FMNIST_DATA__MIRROR_URL": mirror.url + "missing/",
        "FMNIST_DATA__DATA_DIR": str(tmp_path / "fetched"),
    })
    assert result.exit_code == 3
    stderr = " ".join(result.stderr.split())  # rich wraps at the console width
    assert f"{mirror.url}missing/train-images-idx3-ubyte.gz failed: HTTP 404" in stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "fetched").exists() or list((tmp_path / "fetched").iterdir()) == []
