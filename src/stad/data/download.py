"""``python -m stad.data.download dataset=<name>``: fetch a public dataset's official archive,
verify it, extract it safely and check it (MVTec AD, VisA, MVTec 3D-AD, MVTec LOCO AD, BTAD).

What the command does, in order:

1. Shows the archive's official URL, its licence and the SHA-256 it will be checked against;
   refuses an archive whose SHA-256 is not published unless ``verify=false``.
2. Asks once for the licence (y/N); ``accept_licence=true`` accepts it in scripts. The answer is
   remembered in ``<root>/downloads/licences-accepted.json``.
3. Downloads to ``<root>/downloads/<archive>.part``, continuing a partial file with an HTTP Range
   request, and renames it to ``<archive>`` only after its SHA-256 matched.
4. Lists every member before writing any: absolute paths, ``..`` components, links, devices and
   FIFOs refuse the whole archive. Extracts into a temporary folder beside the target and renames
   the complete dataset into place (``<root>/<folder>``, the folder its dataset config names).
5. Runs the checks of ``python -m stad.data.check`` on every category and prints the report.

Only the standard library is used (urllib, tarfile, zipfile, hashlib). Exit code 0 when the
dataset is in place and usable, 2 otherwise (the message on stderr), 130 when interrupted.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import http.client
import json
import lzma
import os
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, TextIO, TypeVar

from omegaconf import DictConfig

from stad import __version__
from stad.cli import Option, optional_path, parse_bool, parse_choice, parse_options, usage
from stad.errors import DatasetError, StadError, lookup
from stad.fileio import write_json_atomic

__all__ = [
    "ARCHIVES",
    "Archive",
    "confirm_licence",
    "download_dataset",
    "extract_archive",
    "fetch",
    "main",
]

_NC_SA = ("CC BY-NC-SA 4.0", "https://creativecommons.org/licenses/by-nc-sa/4.0/")
_MVTEC_NOTE = (
    "non-commercial use only, share alike, attribution (© MVTec Software GmbH); cite the paper"
)


@dataclass(frozen=True)
class Archive:
    """One dataset's official archive: where it is, what it may be used for, how it is checked.

    Attributes:
        title: The dataset's name in messages.
        url: The official download URL.
        file_name: The archive's file name (its format follows from the suffix).
        sha256: The published SHA-256 of the archive, or None when none could be sourced.
        digest_source: Where the digest comes from (shown when verifying), or why there is none.
        licence: The licence's name.
        licence_url: The licence's text.
        licence_note: What the licence means in practice, or a caveat about it.
        homepage: The dataset's page (fresh links, citation).
        md5: A legacy MD5 published where no SHA-256 is; reported, never trusted as verification.
    """

    title: str
    url: str
    file_name: str
    sha256: str | None
    digest_source: str
    licence: str
    licence_url: str
    licence_note: str
    homepage: str
    md5: str | None = None


# The digests are anomalib's `DownloadInfo.hashsum` values (open-edge-platform/anomalib @b723368,
# 2026-08-21), SHA-256 since anomalib #1680 (2024-02-27, "Replace md5 with sha-256"); MVTec's and
# Amazon's pages publish none. The MVTec URLs are the mydrive.ch links of MVTec's download pages
# (they rotate: pass url=... with a fresh link from the homepage when one has expired).
ARCHIVES: dict[str, Archive] = {
    "mvtec": Archive(
        title="MVTec AD",
        # anomalib src/anomalib/data/datamodules/image/mvtecad.py (link updated in #3673)
        url="https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/download/"
        "420938113-1629960298/mvtec_anomaly_detection.tar.xz",
        file_name="mvtec_anomaly_detection.tar.xz",
        sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
        digest_source="anomalib, data/datamodules/image/mvtecad.py",
        licence=_NC_SA[0],
        licence_url=_NC_SA[1],
        licence_note=_MVTEC_NOTE,
        homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad",
    ),
    "visa": Archive(
        title="VisA",
        # github.com/amazon-science/spot-diff README ("Data download"), licence in its
        # README and LICENSE-DATASET (CC BY 4.0); digest: anomalib data/datamodules/image/visa.py
        url="https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
        file_name="VisA_20220922.tar",
        sha256="2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
        digest_source="anomalib, data/datamodules/image/visa.py",
        licence="CC BY 4.0",
        licence_url="https://creativecommons.org/licenses/by/4.0/",
        licence_note="attribution required (Amazon, spot-diff); cite the paper",
        homepage="https://github.com/amazon-science/spot-diff",
    ),
    "mvtec3d": Archive(
        title="MVTec 3D-AD",
        # anomalib src/anomalib/data/datamodules/depth/mvtec_3d.py (link updated in #3673)
        url="https://www.mydrive.ch/shares/150646/25de33f1276dd418cd856f2f48a84cdb/download/"
        "428824485-1643299897/mvtec_3d_anomaly_detection.tar.xz",
        file_name="mvtec_3d_anomaly_detection.tar.xz",
        # anomalib's "hashsum" here is 32 hex digits: the MD5 of its pre-2024 `checksum`, never
        # replaced by a SHA-256 in #1680. No SHA-256 is published anywhere we could find.
        sha256=None,
        digest_source="MVTec publishes none; anomalib lists only a legacy 32-digit MD5",
        licence=_NC_SA[0],
        licence_url=_NC_SA[1],
        licence_note=_MVTEC_NOTE,
        homepage="https://www.mvtec.com/company/research/datasets/mvtec-3d-ad",
        md5="d8bb2800fbf3ac88e798da6ae10dc819",
    ),
    "mvtec_loco": Archive(
        title="MVTec LOCO AD",
        # anomalib src/anomalib/data/datasets/image/mvtec_loco.py (added in #2607, 2025-03-21)
        url="https://www.mydrive.ch/shares/48237/1b9106ccdfbb09a0c414bd49fe44a14a/download/"
        "430647091-1646842701/mvtec_loco_anomaly_detection.tar.xz",
        file_name="mvtec_loco_anomaly_detection.tar.xz",
        sha256="9e7c84dba550fd2e59d8e9e231c929c45ba737b6b6a6d3814100f54d63aae687",
        digest_source="anomalib, data/datasets/image/mvtec_loco.py",
        licence=_NC_SA[0],
        licence_url=_NC_SA[1],
        licence_note=_MVTEC_NOTE,
        homepage="https://www.mvtec.com/company/research/datasets/mvtec-loco",
    ),
    "btad": Archive(
        title="BTAD",
        # The link of the BTAD paper (Mishra et al., ISIE 2021), over https as anomalib uses it
        # (data/datamodules/image/btech.py, digest from #1680).
        url="https://avires.dimi.uniud.it/papers/btad/btad.zip",
        file_name="btad.zip",
        sha256="461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a",
        digest_source="anomalib, data/datamodules/image/btech.py",
        # stad's docs read CC BY-SA from the archive's README (BeanTech srl); anomalib's docs say
        # CC BY-NC-SA 4.0. Both are shown; the stricter reading is the safe one.
        licence="CC BY-SA 4.0",
        licence_url="https://creativecommons.org/licenses/by-sa/4.0/",
        licence_note=(
            "as the archive's README states (BeanTech srl); anomalib's docs say CC BY-NC-SA 4.0 "
            "instead, so treat it as non-commercial until BeanTech confirms; cite the paper"
        ),
        homepage="http://avires.dimi.uniud.it/papers/btad/",
    ),
}
"""The official archive of every dataset stad can download, by dataset name."""

DOWNLOADS = "downloads"
"""The folder under the data root that holds archives, partial downloads and licence answers."""
LICENCES_FILE = "licences-accepted.json"
_CHUNK = 1 << 20
_TIMEOUT_S = 60.0
_COMMAND = "stad.data.download"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


# ----------------------------------------------------------------------------- licence


def _read_accepted(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # missing or damaged: ask again rather than fail
    return data if isinstance(data, dict) else {}


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def confirm_licence(
    name: str, archive: Archive, downloads: Path, accept: bool, stdin: TextIO
) -> None:
    """Make sure the user accepted the dataset's licence; remember the answer.

    An acceptance on record for the same licence counts; otherwise ``accept`` (the
    ``accept_licence=true`` option) or a ``y`` typed at the prompt does.

    Raises:
        StadError: The licence was declined, or stdin is not a terminal and ``accept`` is false.
    """
    record = downloads / LICENCES_FILE
    accepted = _read_accepted(record)
    previous = accepted.get(name)
    if isinstance(previous, dict) and previous.get("licence") == archive.licence:
        _say(f"licence: accepted on {previous.get('accepted', '?')} (recorded in {record})")
        return
    if not accept:
        licence = f"{archive.licence} ({archive.licence_url})"
        if not _is_terminal(stdin):
            raise StadError(
                f"{archive.title} is licensed under {licence}; downloading it needs your "
                "acceptance, and stdin is not a terminal to ask on. Rerun with "
                "accept_licence=true to accept the licence."
            )
        print(f"Do you accept the licence {licence}? [y/N] ", end="", file=sys.stderr, flush=True)
        answer = stdin.readline().strip().lower()
        if answer not in ("y", "yes"):
            raise StadError(
                f"The licence of {archive.title} was not accepted; nothing was downloaded."
            )
    accepted[name] = {
        "licence": archive.licence,
        "licence_url": archive.licence_url,
        "accepted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(record, accepted)


# ----------------------------------------------------------------------------- download


class _Progress:
    """Bytes received so far, on stderr: a line rewritten in place on a terminal, a new line at
    most every 15 s otherwise (logs of batch jobs stay short)."""

    def __init__(self, total: int | None, start: int) -> None:
        self.total = total
        self.start = start
        self.tty = _is_terminal(sys.stderr)
        self.started = self.last = time.monotonic()

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < (0.5 if self.tty else 15.0):
            return
        self.last = now
        rate = (done - self.start) / max(now - self.started, 1e-6)
        share = f" of {_size(self.total)} ({100 * done / self.total:.0f} %)" if self.total else ""
        line = f"  {_size(done)}{share}, {_size(int(rate))}/s"
        end = "\n" if final or not self.tty else ""
        print(f"\r{line}" if self.tty else line, end=end, file=sys.stderr, flush=True)


def _resume_fix(part: Path) -> str:
    return f"{part} is kept: run the same command again to continue the download from there."


def _open(url: str, have: int, part: Path) -> Any:
    """The response to a GET of ``url`` from byte ``have`` on, or None when the partial file
    ``part`` already holds the whole archive (the server answered 416 for a range at its end)."""
    request = urllib.request.Request(url, headers={"User-Agent": f"stad/{__version__}"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        return urllib.request.urlopen(request, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as err:
        total = _total_from_range(err.headers.get("Content-Range"))
        if err.code == 416 and have and total in (None, have):
            return None
        if err.code == 416 and total is not None and have > total:
            raise DatasetError(
                f"{part} holds {have} bytes but the archive at {url} has {total}; it is not a "
                "part of this archive. Delete it and run the command again."
            ) from None
        raise DatasetError(
            f"{url} answered HTTP {err.code} {err.reason}. If the link has expired, get a fresh "
            "one from the dataset's page and pass it as url=..."
        ) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DatasetError(
            f"Cannot reach {url} ({reason}). Check the network connection (urllib honours "
            "https_proxy) and run the command again."
        ) from None


def _total_from_range(header: str | None) -> int | None:
    """The complete size of ``Content-Range: bytes a-b/total`` (or ``bytes */total``)."""
    match = re.fullmatch(r"bytes [^/]+/(\d+)", (header or "").strip())
    return int(match.group(1)) if match else None


def fetch(url: str, part: Path) -> None:
    """Download ``url`` into ``part``, continuing a partial file with an HTTP Range request.

    A server that ignores the Range header sends the whole file, which then replaces the part.

    Raises:
        DatasetError: The server cannot be reached, answers an error or a web page, or the
            connection ends before the announced size (``part`` is kept for the next run).
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    response = _open(url, have, part)
    if response is None:
        _say(f"{part.name}: already complete ({_size(have)})")
        return
    with response:
        if "text/html" in (response.headers.get("Content-Type") or ""):
            raise DatasetError(
                f"{url} answered with a web page, not an archive: the link has probably "
                "expired or needs a login. Get a fresh link from the dataset's page and pass it "
                "as url=..."
            )
        if have and response.status == 206:
            start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range") or "")
            if start is None or int(start.group(1)) != have:
                raise DatasetError(
                    f"{url} answered the request for bytes {have}- with another range "
                    f"({response.headers.get('Content-Range')}); delete {part} and run again."
                )
            _say(f"{part.name}: continuing after {_size(have)}")
        elif have:
            _say(f"{part.name}: the server ignored the Range request; starting over")
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        _copy(response, part, have, total)


def _copy(response: Any, part: Path, have: int, total: int | None) -> None:
    progress = _Progress(total, have)
    done = have
    # Append to what is there (or truncate when starting over): every byte written survives an
    # interruption, so the next run continues from it.
    with part.open("ab" if have else "wb") as out:
        try:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                done += len(chunk)
                progress.update(done)
        except (http.client.HTTPException, OSError) as err:
            progress.update(done, final=True)
            raise DatasetError(
                f"The download of {part.name} broke off after {_size(done)} ({err!r}). "
                f"{_resume_fix(part)}"
            ) from None
        out.flush()
        os.fsync(out.fileno())
    progress.update(done, final=True)
    if total is not None and done < total:
        raise DatasetError(
            f"The connection closed after {done} of {total} bytes of {part.name}. "
            f"{_resume_fix(part)}"
        )


# ----------------------------------------------------------------------------- verification


def _digests(path: Path) -> tuple[str, str]:
    """SHA-256 and MD5 of a file, in one pass."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


def _verify(path: Path, archive: Archive, verify: bool) -> None:
    """Compare the file's SHA-256 with the published one (a mismatch keeps the file).

    Raises:
        DatasetError: The digests differ and ``verify`` is true.
    """
    _say(f"{path.name}: computing SHA-256 of {_size(path.stat().st_size)} ...")
    actual, md5 = _digests(path)
    if verify and archive.sha256 is not None:
        if actual != archive.sha256:
            raise DatasetError(
                f"{path} has SHA-256 {actual}, but the official {archive.title} archive has "
                f"{archive.sha256} ({archive.digest_source}). The download is damaged or the "
                f"server sent another file; nothing was extracted and the file is kept. Delete "
                f"{path} and run the command again; if the digest differs again, the archive was "
                f"probably re-released: check with {archive.homepage} and rerun with verify=false "
                "to use it anyway."
            )
        _say(f"{path.name}: SHA-256 verified ({actual})")
        return
    if archive.sha256 is not None and actual != archive.sha256:
        _say(f"warning: SHA-256 {actual} differs from the published {archive.sha256}; used anyway")
    else:
        _say(f"{path.name}: SHA-256 {actual} (NOT verified: {archive.digest_source})")
    if archive.md5 is not None:
        verdict = "matches" if md5 == archive.md5 else "DIFFERS FROM"
        _say(f"{path.name}: MD5 {md5} {verdict} the legacy MD5 on record ({archive.md5})")


# ----------------------------------------------------------------------------- extraction


@dataclass(frozen=True)
class _Member:
    parts: tuple[str, ...]
    is_dir: bool


def _refuse(archive: Path, name: str, what: str) -> DatasetError:
    return DatasetError(
        f"{archive} is refused and nothing was extracted: its member {name!r} is {what}. stad "
        "extracts only folders and regular files with relative paths inside the archive, as "
        f"every dataset archive holds. Delete {archive} and download it from the official source."
    )


def _safe_parts(archive: Path, name: str) -> tuple[str, ...]:
    """A member name as path parts, or a refusal. Backslashes count as separators too, so a
    ``..\\`` written on Windows cannot slip through."""
    if "\x00" in name:
        raise _refuse(archive, name, "a name with a NUL byte")
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        raise _refuse(archive, name, "an absolute path")
    parts = tuple(p for p in re.split(r"[/\\]", name) if p not in ("", "."))
    if ".." in parts:
        raise _refuse(archive, name, "a path with a '..' component (it could escape the folder)")
    return parts


def _tar_member(archive: Path, info: tarfile.TarInfo) -> _Member:
    parts = _safe_parts(archive, info.name)
    if info.isdir() or info.isreg():
        return _Member(parts, info.isdir())
    if info.issym():
        what = f"a symbolic link (to {info.linkname!r})"
    elif info.islnk():
        what = f"a hard link (to {info.linkname!r})"
    elif info.ischr() or info.isblk():
        what = "a device file"
    elif info.isfifo():
        what = "a FIFO"
    else:
        what = f"an entry of tar type {info.type!r}"
    raise _refuse(archive, info.name, what)


def _zip_member(archive: Path, info: zipfile.ZipInfo) -> _Member:
    parts = _safe_parts(archive, info.filename)
    kind = stat.S_IFMT(info.external_attr >> 16)  # Unix file type; 0 for archives made on DOS
    if kind == stat.S_IFLNK:
        raise _refuse(archive, info.filename, "a symbolic link")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise _refuse(archive, info.filename, "a special file (device, FIFO or socket)")
    if info.flag_bits & 0x1:
        raise _refuse(archive, info.filename, "encrypted")
    return _Member(parts, info.is_dir() or kind == stat.S_IFDIR)


T = TypeVar("T")


def _write_members(
    dest: Path, entries: Sequence[tuple[_Member, T]], opener: Callable[[T], IO[bytes] | None]
) -> int:
    """Write validated members below ``dest`` (an empty folder); returns the number of files."""
    root = os.path.abspath(dest)
    for member, _ in entries:
        # A last guard on the joined path, whatever the platform's path rules.
        joined = os.path.normpath(os.path.join(root, *member.parts))
        if joined != root and not joined.startswith(root + os.sep):
            raise DatasetError(f"member {'/'.join(member.parts)!r} would land outside {dest}")
    files = 0
    for member, info in entries:
        path = dest.joinpath(*member.parts)
        if member.is_dir:
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        source = opener(info)
        if source is None:
            continue
        with source, path.open("wb") as out:
            shutil.copyfileobj(source, out, _CHUNK)
        files += 1
    return files


def extract_archive(archive: Path, dest: Path) -> int:
    """Check every member of a tar (.tar, .tar.gz, .tar.xz ...) or zip archive, then extract it
    into the folder ``dest``.

    Nothing is written unless every member is a folder or a regular file with a relative path
    that stays inside ``dest``.

    Returns:
        The number of files written.

    Raises:
        DatasetError: A member is refused (naming it), or the archive cannot be read.
    """
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                zip_entries = [(_zip_member(archive, i), i) for i in zf.infolist()]
                return _write_members(dest, zip_entries, zf.open)
        with tarfile.open(archive, "r:*") as tf:
            # Iterating reads every header first; extraction then seeks back to each member.
            tar_entries = [(_tar_member(archive, i), i) for i in tf]
            return _write_members(dest, tar_entries, tf.extractfile)
    except (tarfile.TarError, zipfile.BadZipFile, lzma.LZMAError, EOFError) as err:
        raise DatasetError(
            f"Cannot read {archive} as an archive ({err}); delete it and download it again."
        ) from None
    except OSError as err:
        raise DatasetError(f"Extracting {archive} into {dest} failed: {err}") from None


def _dataset_folder(extracted: Path, categories: Sequence[str], archive: Path) -> Path:
    """The extracted folder that holds the category folders: the top, or its only sub-folder
    when the archive wraps the dataset in one (BTAD: ``BTech_Dataset_transformed/``)."""
    if any((extracted / c).is_dir() for c in categories):
        return extracted
    folders = [p for p in extracted.iterdir() if p.is_dir()]
    if len(folders) == 1 and any((folders[0] / c).is_dir() for c in categories):
        return folders[0]
    found = sorted(p.name for p in extracted.iterdir())
    raise DatasetError(
        f"{archive} holds none of the category folders {', '.join(categories)} at its top or in "
        f"its only folder; it holds {', '.join(found[:20]) or 'nothing'}. It is not the dataset's "
        "archive: delete it and download the official one."
    )


def _install(archive: Path, target: Path, categories: Sequence[str]) -> None:
    """Extract ``archive`` into a temporary folder beside ``target``, then rename the dataset
    into place: ``target`` appears complete or not at all."""
    for stale in target.parent.glob(f".{target.name}.extract-*"):
        _say(f"removing {stale}, left by an interrupted extraction")
        shutil.rmtree(stale, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.extract-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the dataset from a team's other users
        _say(f"{archive.name}: checking members and extracting ...")
        files = extract_archive(archive, tmp)
        os.rename(_dataset_folder(tmp, categories, archive), target)
        _say(f"{archive.name}: {files} files extracted into {target}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- the command


@functools.lru_cache(maxsize=8)
def _run_config(name: str) -> DictConfig:
    """The config ``python -m stad dataset=<name>`` runs with (composed once per process; the
    root's ``${oc.env:STAD_DATA,data}`` is resolved when read, so the cache never goes stale)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("stad.conf", version_base="1.3"):
        return compose("config", overrides=[f"dataset={name}"])


def _describe(archive: Archive, url: str, path: Path, target: Path, verify: bool) -> None:
    if archive.sha256 is not None:
        digest = f"{archive.sha256} ({archive.digest_source})"
    else:
        digest = f"unknown: {archive.digest_source}"
    lines = [
        f"{archive.title}",
        f"  source:  {url}" + ("" if url == archive.url else f" (official: {archive.url})"),
        f"  licence: {archive.licence} <{archive.licence_url}>",
        f"           {archive.licence_note}",
        f"  dataset: {archive.homepage}",
        f"  SHA-256: {digest}" + ("" if verify else " — verify=false: not checked"),
        f"  archive: {path}",
        f"  into:    {target}",
    ]
    _say("\n".join(lines))


def download_dataset(
    name: str,
    root: Path | None = None,
    *,
    accept_licence: bool = False,
    verify: bool = True,
    url: str | None = None,
    archives: Mapping[str, Archive] = ARCHIVES,
    stdin: TextIO | None = None,
) -> Path:
    """Download, verify and extract one dataset into ``<root>/<folder of its config>``.

    Args:
        name: The dataset, e.g. ``"mvtec"`` (a key of ``archives`` and a dataset config).
        root: The data folder (what ``STAD_DATA`` names); None for its default.
        accept_licence: Accept the licence without asking.
        verify: Require and check the published SHA-256.
        url: Download from here instead of the official URL (a mirror); same digest.
        archives: The archive table (tests serve their own).
        stdin: Where the licence answer is read (default ``sys.stdin``).

    Returns:
        The dataset folder (``dataset.root`` of its runs).

    Raises:
        StadError: Unknown dataset, licence not accepted, or no published digest with ``verify``.
        DatasetError: The download, the verification or the extraction failed.
    """
    archive = lookup(dict(archives), "dataset", name)
    config = _run_config(name).dataset
    default_root = Path(str(config.root)).expanduser()
    data_dir = (root or default_root.parent).expanduser()
    target = data_dir / default_root.name
    if target.exists():
        _say(
            f"{target} already exists; not downloading {archive.title} again (delete the folder "
            "to download a fresh copy)."
        )
        return target
    downloads = data_dir / DOWNLOADS
    path = downloads / archive.file_name
    source = url or archive.url
    _describe(archive, source, path, target, verify)
    if archive.sha256 is None and verify:
        raise StadError(
            f"stad knows no published SHA-256 of {archive.title}'s archive {archive.file_name} "
            f"({archive.digest_source}), so it cannot verify the download. Rerun with "
            "verify=false to download it unverified; stad then prints its SHA-256 for your records."
        )
    confirm_licence(name, archive, downloads, accept_licence, stdin or sys.stdin)
    if path.is_file():
        _say(f"{path.name}: already downloaded")
        _verify(path, archive, verify)
    else:
        part = path.with_name(path.name + ".part")
        fetch(source, part)
        _verify(part, archive, verify)
        os.replace(part, path)  # the final name only for a verified archive
    _install(path, target, [str(c) for c in config.categories])
    _say(f"{path} may be deleted now to free {_size(path.stat().st_size)}.")
    return target


def _check(name: str, folder: Path) -> bool:
    """Print the layout report of every category (``python -m stad.data.check``); True when all
    are usable."""
    from stad.data.check_command import check_dataset

    cfg = copy.deepcopy(_run_config(name))
    # Set, not passed as overrides: any path works, spaces and quotes included.
    cfg.dataset.root = str(folder)
    cfg.dataset.category = "all"
    reports = check_dataset(cfg)
    for report in reports:
        print(report.format(), flush=True)
    usable = sum(r.usable for r in reports)
    _say(f"{usable} of {len(reports)} categories usable at {folder}")
    return usable == len(reports)


OPTIONS: dict[str, Option] = {
    "dataset": Option(parse_choice(*ARCHIVES), None, " | ".join(ARCHIVES)),
    "root": Option(
        optional_path,
        None,
        "the data folder (what STAD_DATA names; default $STAD_DATA, else ./data); the dataset "
        "goes to <root>/<its config's folder>, e.g. <root>/mvtec_ad",
    ),
    "accept_licence": Option(parse_bool, False, "accept the dataset's licence without asking"),
    "verify": Option(
        parse_bool, True, "require the published SHA-256; false downloads without one"
    ),
    "url": Option(str, None, "download from this URL instead (a mirror; the same SHA-256)"),
}

SUMMARY = (
    "Download a dataset's official archive (licence shown and confirmed, SHA-256 verified,\n"
    "resumable), extract it safely into <root>/<folder> and check it like python -m\n"
    "stad.data.check. Progress on stderr, the check's report on stdout."
)


def main(
    argv: Sequence[str] | None = None,
    *,
    archives: Mapping[str, Archive] = ARCHIVES,
    stdin: TextIO | None = None,
) -> int:
    """``python -m stad.data.download dataset=<name> [root=DIR] [accept_licence=true] ...``.

    Returns:
        0 when the dataset is in place and every category is usable, 2 on an error or an unusable
        category (message on stderr), 130 when interrupted (a partial download is kept).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in args):
        print(usage(_COMMAND, OPTIONS, SUMMARY))
        return 0
    try:
        opts = parse_options(args, OPTIONS, _COMMAND, required=("dataset",))
        folder = download_dataset(
            opts["dataset"],
            opts["root"],
            accept_licence=opts["accept_licence"],
            verify=opts["verify"],
            url=opts["url"],
            archives=archives,
            stdin=stdin,
        )
        usable = _check(opts["dataset"], folder)
    except StadError as err:
        print(f"{_COMMAND}: error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        _say(f"{_COMMAND}: interrupted; a partial download is kept and continues on the next run")
        return 130
    if usable:
        _say(f"Run it with: python -m stad dataset={opts['dataset']} dataset.root={folder}")
    return 0 if usable else 2


if __name__ == "__main__":
    sys.exit(main())
