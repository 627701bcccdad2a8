"""``python -m stad.data.download``: fake archives served from a local HTTP server on 127.0.0.1
(real sockets, Range requests; nothing leaves the machine): download, resume, truncation, digest
mismatch, hostile archives, licence acceptance, then the dataset check."""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import stat
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stad.data import DATASETS
from stad.data.download import (
    ARCHIVES,
    DOWNLOADS,
    LICENCES_FILE,
    Archive,
    download_dataset,
    extract_archive,
    main,
)
from stad.data.fakes import write_fake_btad, write_fake_visa
from stad.data.mvtec import MVTEC_AD_CATEGORIES
from stad.data.visa import VISA_CATEGORIES
from stad.errors import DatasetError, StadError

# ----------------------------------------------------------------------------- the local server


@dataclass
class Served:
    """What the server serves and what it was asked."""

    files: dict[str, bytes] = field(default_factory=dict)
    cut: dict[str, int] = field(default_factory=dict)  # close after this many body bytes
    content_type: str = "application/octet-stream"
    ranges: bool = True  # honour Range headers
    log: list[tuple[str, str | None]] = field(default_factory=list)
    base: str = ""

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"


class _Handler(BaseHTTPRequestHandler):
    served: Served

    def do_GET(self) -> None:
        served = self.served
        wanted = self.headers.get("Range")
        served.log.append((self.path, wanted))
        body = served.files.get(self.path.lstrip("/"))
        if body is None:
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", wanted or "")
        if match and served.ranges:
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", served.content_type)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        cut = served.cut.get(self.path.lstrip("/"))
        # A cut connection: the announced length, fewer bytes, then the socket closes.
        self.wfile.write(payload if cut is None else payload[:cut])

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server(monkeypatch) -> Iterator[Served]:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)  # 127.0.0.1 must never go through a proxy
    served = Served()
    handler = type("Handler", (_Handler,), {"served": served})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    served.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield served
    httpd.shutdown()
    httpd.server_close()


# ----------------------------------------------------------------------------- fake archives


def _png(path: Path, value: int, mask: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((8, 8), np.uint8)
    if mask:
        pixels[2:5, 2:5] = 255
    else:
        pixels[:] = value
    Image.fromarray(pixels if mask else np.stack([pixels] * 3, -1)).save(path)


def write_tiny_mvtec(root: Path) -> Path:
    """Every MVTec AD category with 2 training, 1 normal and 1 anomalous test image (8×8 px)."""
    for category in MVTEC_AD_CATEGORIES:
        cat = root / category
        _png(cat / "train" / "good" / "000.png", 100)
        _png(cat / "train" / "good" / "001.png", 110)
        _png(cat / "test" / "good" / "000.png", 105)
        _png(cat / "test" / "crack" / "000.png", 200)
        _png(cat / "ground_truth" / "crack" / "000_mask.png", 0, mask=True)
    (root / "license.txt").write_text("CC BY-NC-SA 4.0\n")
    return root


def tar_of(folder: Path, out: Path, mode: str = "w:xz", extra: tuple = ()) -> bytes:
    """A tar of ``folder``'s contents (names relative to it), then ``extra`` TarInfo members."""
    with tarfile.open(out, mode) as tf:
        for path in sorted(folder.rglob("*")):
            tf.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
        for info, data in extra:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.read_bytes()


def zip_of(folder: Path, out: Path, prefix: str = "", extra: tuple = ()) -> bytes:
    """A zip of ``folder``'s files under ``prefix``, then ``extra`` (ZipInfo, bytes) members."""
    with zipfile.ZipFile(out, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(folder).as_posix())
        for info, data in extra:
            zf.writestr(info, data)
    return out.read_bytes()


def _table(served: Served, name: str, body: bytes, file_name: str) -> dict[str, Archive]:
    """The official table with ``name`` served locally and checked against ``body``'s digest."""
    served.files[file_name] = body
    digest = hashlib.sha256(body).hexdigest()
    entry = replace(ARCHIVES[name], url=served.url(file_name), file_name=file_name, sha256=digest)
    return {**ARCHIVES, name: entry}


@pytest.fixture(scope="module")
def mvtec_tar(tmp_path_factory) -> bytes:
    tmp = tmp_path_factory.mktemp("mvtec-archive")
    return tar_of(write_tiny_mvtec(tmp / "src"), tmp / "mvtec.tar.xz")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob(".*.extract-*"))


# ----------------------------------------------------------------------------- the table


def test_table_has_every_dataset_with_official_https_urls() -> None:
    assert set(ARCHIVES) == {"mvtec", "visa", "mvtec3d", "mvtec_loco", "btad"} <= set(DATASETS)
    for name, entry in ARCHIVES.items():
        assert entry.url.startswith("https://"), name
        assert entry.url.rsplit("/", 1)[1] == entry.file_name, name
        assert entry.licence_url.startswith("https://creativecommons.org/licenses/"), name
        # A digest is a SHA-256 (64 hex digits) or unknown: never an MD5 in its place.
        assert entry.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", entry.sha256), name
    assert ARCHIVES["mvtec3d"].sha256 is None  # anomalib's is a legacy MD5, not a SHA-256
    assert ARCHIVES["visa"].licence == "CC BY 4.0"
    assert {ARCHIVES[n].licence for n in ("mvtec", "mvtec3d", "mvtec_loco")} == {"CC BY-NC-SA 4.0"}


# ----------------------------------------------------------------------------- downloads


def test_download_verifies_extracts_checks_and_remembers_the_licence(
    server, tmp_path, mvtec_tar, capsys
) -> None:
    archives = _table(server, "mvtec", mvtec_tar, "mvtec.tar.xz")
    args = ["dataset=mvtec", f"root={tmp_path}"]
    assert main([*args, "accept_licence=true"], archives=archives) == 0
    out, err = capsys.readouterr()
    assert server.url("mvtec.tar.xz") in err and "CC BY-NC-SA 4.0" in err
    assert "SHA-256 verified" in err and "15 of 15 categories usable" in err
    assert out.count(": usable") == 15 and "MVTec AD at" in out
    target = tmp_path / "mvtec_ad"
    assert (target / "bottle" / "ground_truth" / "crack" / "000_mask.png").is_file()
    assert (target / "license.txt").is_file()
    assert (tmp_path / DOWNLOADS / "mvtec.tar.xz").is_file()
    assert not (tmp_path / DOWNLOADS / "mvtec.tar.xz.part").exists() and not _leftovers(tmp_path)
    assert (tmp_path / DOWNLOADS / LICENCES_FILE).is_file()

    # A re-run finds the dataset and only checks it.
    assert main(args, archives=archives, stdin=io.StringIO("")) == 0
    assert "already exists" in capsys.readouterr().err and len(server.log) == 1

    # Without the folder, the kept archive is verified and extracted again without a new
    # request, and the licence is not asked again (non-interactive stdin, no flag).
    shutil.rmtree(target)
    assert main(args, archives=archives, stdin=io.StringIO("")) == 0
    assert "licence: accepted on" in capsys.readouterr().err and len(server.log) == 1
    assert (target / "zipper" / "train" / "good" / "001.png").is_file()


def _download(archives: dict[str, Archive], root: Path, **kwargs) -> Path:
    return download_dataset("mvtec", root, accept_licence=True, archives=archives, **kwargs)


def _part(root: Path, body: bytes | None = None) -> Path:
    part = root / DOWNLOADS / "mvtec.tar.xz.part"
    if body is not None:
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_bytes(body)
    return part


def test_a_partial_download_resumes_with_a_range_request(server, tmp_path, mvtec_tar) -> None:
    archives = _table(server, "mvtec", mvtec_tar, "mvtec.tar.xz")
    half = len(mvtec_tar) // 2
    _part(tmp_path, mvtec_tar[:half])
    assert _download(archives, tmp_path) == tmp_path / "mvtec_ad"
    assert server.log == [("/mvtec.tar.xz", f"bytes={half}-")]
    assert (tmp_path / DOWNLOADS / "mvtec.tar.xz").read_bytes() == mvtec_tar


def test_a_complete_part_file_is_not_downloaded_again(server, tmp_path, mvtec_tar) -> None:
    archives = _table(server, "mvtec", mvtec_tar, "mvtec.tar.xz")
    _part(tmp_path, mvtec_tar)
    _download(archives, tmp_path)
    assert server.log == [("/mvtec.tar.xz", f"bytes={len(mvtec_tar)}-")]  # answered 416
    assert (tmp_path / "mvtec_ad" / "bottle").is_dir()


def test_a_part_longer_than_the_archive_is_reported(server, tmp_path, mvtec_tar) -> None:
    archives = _table(server, "mvtec", mvtec_tar, "mvtec.tar.xz")
    _part(tmp_path, mvtec_tar + b"more")
    with pytest.raises(DatasetError, match="not a part of this archive"):
        _download(archives, tmp_path)


def test_a_server_ignoring_range_restarts_the_file(server, tmp_path, mvtec_tar, capsys) -> None:
    archives = _table(server, "mvtec", mvtec_tar, "mvtec.tar.xz")
    server.ranges = False
    _part(tmp_path, b"junk that must not stay in front")
    _download(archives, tmp_path)
    assert "ignored the Range request" in capsys.readouterr().err
    assert (tmp_path / DOWNLOADS / "mvtec.tar.xz").read_bytes() == mvtec_tar


def test_a_cut_connection_keeps_the_part_and_the_next_run_resumes(
    server, tmp_path, mvtec_tar
) -> None:
    archives = _table(server, "mvtec", mvtec_tar, "mvtec.tar.xz")
    server.cut["mvtec.tar.xz"] = 1000
    with pytest.raises(DatasetError) as err:
        _download(archives, tmp_path)
    assert f"closed after 1000 of {len(mvtec_tar)} bytes" in str(err.value)
    assert "run the same command again to continue" in str(err.value)
    assert _part(tmp_path).read_bytes() == mvtec_tar[:1000]
    assert not (tmp_path / "mvtec_ad").exists()
    assert not (tmp_path / DOWNLOADS / "mvtec.tar.xz").exists()

    del server.cut["mvtec.tar.xz"]
    _download(archives, tmp_path)
    assert server.log[-1] == ("/mvtec.tar.xz", "bytes=1000-")
    assert (tmp_path / DOWNLOADS / "mvtec.tar.xz").read_bytes() == mvtec_tar


def test_a_wrong_digest_stops_naming_both_digests_and_deletes_nothing(
    server, tmp_path, mvtec_tar, capsys
) -> None:
    archives = _table(server, "mvtec", mvtec_tar, "mvtec.tar.xz")
    archives["mvtec"] = replace(archives["mvtec"], sha256="0" * 64)
    assert (
        main(["dataset=mvtec", f"root={tmp_path}", "accept_licence=true"], archives=archives) == 2
    )
    err = capsys.readouterr().err
    part = _part(tmp_path)
    assert f"{part} has SHA-256 {hashlib.sha256(mvtec_tar).hexdigest()}" in err
    assert "0" * 64 in err and f"Delete {part}" in err and err.count("error:") == 1
    assert part.read_bytes() == mvtec_tar  # kept, and not renamed to the verified name
    assert not (tmp_path / DOWNLOADS / "mvtec.tar.xz").exists()
    assert not (tmp_path / "mvtec_ad").exists()


def test_an_unknown_digest_needs_verify_false(server, tmp_path, mvtec_tar, capsys) -> None:
    archives = _table(server, "mvtec", mvtec_tar, "mvtec.tar.xz")
    archives["mvtec"] = replace(archives["mvtec"], sha256=None, digest_source="none published")
    with pytest.raises(StadError, match="verify=false"):
        _download(archives, tmp_path)
    assert server.log == []
    _download(archives, tmp_path, verify=False)
    digest = hashlib.sha256(mvtec_tar).hexdigest()
    assert f"SHA-256 {digest} (NOT verified" in capsys.readouterr().err


def test_a_web_page_instead_of_the_archive_is_refused(server, tmp_path) -> None:
    archives = _table(server, "mvtec", b"<html>log in</html>", "mvtec.tar.xz")
    server.content_type = "text/html; charset=utf-8"
    with pytest.raises(DatasetError, match="web page"):
        _download(archives, tmp_path)


def test_visa_tar_and_btad_zip_with_its_wrapper_folder(server, tmp_path, capsys) -> None:
    visa = tar_of(
        write_fake_visa(tmp_path / "v", VISA_CATEGORIES, 2, 1, 1), tmp_path / "v.tar", "w"
    )
    btad = zip_of(write_fake_btad(tmp_path / "b"), tmp_path / "b.zip", "BTech_Dataset_transformed/")
    root = tmp_path / "data"
    for name, body, file_name, folder in (
        ("visa", visa, "VisA_20220922.tar", "visa"),
        ("btad", btad, "btad.zip", "btad"),
    ):
        archives = _table(server, name, body, file_name)
        assert (
            main([f"dataset={name}", f"root={root}", "accept_licence=true"], archives=archives) == 0
        )
        assert (root / folder).is_dir()
    assert (root / "visa" / "split_csv" / "1cls.csv").is_file()
    assert (root / "btad" / "01" / "train" / "ok").is_dir()  # the wrapper folder is dropped
    assert "3 of 3 categories usable" in capsys.readouterr().err


# ----------------------------------------------------------------------------- hostile archives


def _tar_info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    data = b"evil\n" if kind == tarfile.REGTYPE else None
    info.size = len(data) if data else 0
    return info, data


def _zip_link(name: str, target: str) -> tuple:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix: the high 16 bits of external_attr are the file mode
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target


HOSTILE = {
    "dotdot": ("tar", _tar_info("../evil.txt"), "'..' component"),
    "nested dotdot": ("tar", _tar_info("bottle/../../evil.txt"), "'..' component"),
    "absolute": ("tar", _tar_info("/tmp/stad-evil.txt"), "absolute path"),
    "symlink": ("tar", _tar_info("bottle/link", tarfile.SYMTYPE, "/etc/passwd"), "symbolic link"),
    "hardlink": ("tar", _tar_info("bottle/hard", tarfile.LNKTYPE, "/etc/passwd"), "hard link"),
    "device": ("tar", _tar_info("bottle/dev", tarfile.CHRTYPE), "device file"),
    "fifo": ("tar", _tar_info("bottle/fifo", tarfile.FIFOTYPE), "FIFO"),
    "zip dotdot": ("zip", (zipfile.ZipInfo("../evil.txt"), b"evil\n"), "'..' component"),
    "zip backslash": ("zip", (zipfile.ZipInfo("..\\evil.txt"), b"evil\n"), "'..' component"),
    "zip absolute": ("zip", (zipfile.ZipInfo("/tmp/stad-evil.txt"), b"evil\n"), "absolute path"),
    "zip symlink": ("zip", _zip_link("bottle/link", "/etc/passwd"), "symbolic link"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_members_refuse_the_whole_archive(tmp_path, case) -> None:
    kind, member, what = HOSTILE[case]
    src = tmp_path / "src"
    _png(src / "bottle" / "train" / "good" / "000.png", 1)  # a good member before the bad one
    if kind == "tar":
        archive = tmp_path / "a.tar.gz"
        tar_of(src, archive, "w:gz", extra=(member,))
    else:
        archive = tmp_path / "a.zip"
        zip_of(src, archive, extra=(member,))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DatasetError, match="nothing was extracted") as err:
        extract_archive(archive, dest)
    name = member[0].name if kind == "tar" else member[0].filename
    assert what in str(err.value) and repr(name) in str(err.value)
    assert list(dest.iterdir()) == []  # not even the good member
    assert not (tmp_path / "evil.txt").exists()


def test_a_hostile_download_leaves_no_dataset_and_no_temporary_folder(
    server, tmp_path, capsys
) -> None:
    src = write_tiny_mvtec(tmp_path / "src")
    body = tar_of(src, tmp_path / "bad.tar.xz", extra=(_tar_info("../evil.txt"),))
    archives = _table(server, "mvtec", body, "mvtec.tar.xz")
    root = tmp_path / "data"
    assert main(["dataset=mvtec", f"root={root}", "accept_licence=true"], archives=archives) == 2
    err = capsys.readouterr().err
    assert "'../evil.txt'" in err and "nothing was extracted" in err
    assert not (root / "mvtec_ad").exists() and not _leftovers(root)
    assert not (root / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert (root / DOWNLOADS / "mvtec.tar.xz").is_file()  # verified archive kept, not deleted


# ----------------------------------------------------------------------------- the licence


def test_no_licence_acceptance_without_a_terminal_names_the_option(
    server, tmp_path, mvtec_tar, capsys
) -> None:
    archives = _table(server, "mvtec", mvtec_tar, "mvtec.tar.xz")
    assert (
        main(["dataset=mvtec", f"root={tmp_path}"], archives=archives, stdin=io.StringIO("")) == 2
    )
    err = capsys.readouterr().err
    assert "accept_licence=true" in err and "CC BY-NC-SA 4.0" in err
    assert server.log == [] and not (tmp_path / DOWNLOADS / LICENCES_FILE).exists()


def test_the_prompt_accepts_y_and_refuses_anything_else(
    server, tmp_path, mvtec_tar, capsys
) -> None:
    archives = _table(server, "mvtec", mvtec_tar, "mvtec.tar.xz")
    args = ["dataset=mvtec", f"root={tmp_path}"]
    assert main(args, archives=archives, stdin=_Tty("\n")) == 2  # the default is No
    assert "was not accepted" in capsys.readouterr().err and server.log == []
    assert main(args, archives=archives, stdin=_Tty("y\n")) == 0
    assert "[y/N]" in capsys.readouterr().err
    assert "CC BY-NC-SA 4.0" in (tmp_path / DOWNLOADS / LICENCES_FILE).read_text()
