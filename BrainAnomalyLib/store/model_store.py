"""Installing models the user brings (a folder, a .zip, a URL with its sha256) and checking the shipped registry.

Everything a user hands us is untrusted: archives are unpacked member by member with the paths, types and total
size checked, and a model is staged next to its destination and validated with `models.load_model` (every file
against the sha256 in its model.json, a known scorer kind) before a single rename makes it visible. A failed,
refused or cancelled import therefore leaves nothing in the models folder. No Qt and no slicer here: the Slicer
panel and the CLI both call these functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import List, Optional

from ..core.errors import BadInputError, ModelError
from ..core.files import folder_digest, replace_folder
from .models import META_FILE, load_model, shipped_entries, shipped_registry_file, user_models_dir
from ..core.progress import Reporter

# A model is a few MB today; learned models may reach a few hundred MB. The cap stops a zip bomb or a runaway
# download from filling the disk long before it could be a real model.
MAX_MODEL_BYTES = 2 * 1024 ** 3
MAX_MEMBERS = 10_000
_CHUNK = 1 << 20

REGISTRY_FIELDS = ("id", "version", "kind", "modality", "inputs", "size_bytes", "sha256", "description")


# ----------------------------------------------------------------------------------------------------------------
# helpers


class ModelExistsError(ModelError):
    """A model of that name is installed already; importing again with `overwrite` replaces it."""


def folder_size(folder: Path) -> int:
    """Total bytes of the files of a folder, the way the registry's size_bytes counts them."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def safe_name(name: str) -> str:
    """A model name turned into a folder name that cannot escape the models folder or hide from listings."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip(".-_")[:100]
    if not cleaned:
        raise ModelError(f"model name {name!r} cannot be used as a folder name")
    return cleaned


def entry_for(meta: dict, folder: Path, source: str = "user") -> dict:
    """A registry-style entry for an installed model folder (what models.json holds for shipped ones)."""
    folder = Path(folder)
    return {"id": folder.name, "version": meta.get("version", "1.0.0"), "kind": meta.get("kind"),
            "modality": meta.get("modality"), "inputs": list(meta.get("inputs") or [meta.get("modality")]),
            "size_bytes": folder_size(folder), "sha256": folder_digest(folder),
            "description": meta.get("description", ""), "source": source}


def _check_sha256(value: str) -> str:
    value = (value or "").strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise BadInputError(f"expected sha256 is not 64 hex digits: {value!r}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# staging: copy or unpack into a private folder, checking as we go


def _member_path(root: Path, name: str) -> Path:
    """Where a zip member goes, refusing anything that would land outside `root` (zip-slip)."""
    posix = name.replace("\\", "/")
    parts = PurePosixPath(posix).parts
    if (posix.startswith("/") or not parts or ".." in parts or ":" in parts[0]):
        raise ModelError(f"unsafe path {name!r} in the archive (absolute or outside the model folder); refused")
    target = root.joinpath(*parts)
    if os.path.commonpath([os.path.abspath(target), os.path.abspath(root)]) != os.path.abspath(root):
        raise ModelError(f"unsafe path {name!r} in the archive; refused")
    return target


def _extract_zip(archive: Path, root: Path, reporter: Reporter) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BadInputError(f"{archive} is not a readable zip file ({exc})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise ModelError(f"{archive} has {len(infos)} entries; a model has a handful (refused)")
        # The declared sizes are checked up front for a clear message; the bytes actually written are counted
        # too, since the header of a crafted archive can lie.
        declared = sum(i.file_size for i in infos)
        if declared > MAX_MODEL_BYTES:
            raise ModelError(f"{archive} would unpack to {declared / 1e9:.1f} GB, more than the "
                             f"{MAX_MODEL_BYTES / 1e9:.1f} GB a model may take (refused)")
        written = 0
        for n, info in enumerate(infos):
            reporter("unpack model", n / max(len(infos), 1))
            target = _member_path(root, info.filename)
            # Unix file type from the high bits; zips made on Windows, or by writers that store permissions
            # only, leave it 0, which means a plain file.
            ftype = stat.S_IFMT(info.external_attr >> 16)
            if ftype == stat.S_IFLNK:
                raise ModelError(f"{archive}: {info.filename!r} is a symbolic link; model archives may only "
                                 "hold plain files (refused)")
            if ftype not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise ModelError(f"{archive}: {info.filename!r} is not a plain file (refused)")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src, open(target, "xb") as dst:
                    for chunk in iter(lambda: src.read(_CHUNK), b""):
                        written += len(chunk)
                        if written > MAX_MODEL_BYTES:
                            raise ModelError(f"{archive} unpacks to more than {MAX_MODEL_BYTES / 1e9:.1f} GB "
                                             "(refused)")
                        dst.write(chunk)
            except FileExistsError:
                raise ModelError(f"{archive}: {info.filename!r} appears twice (refused)") from None
            except (zipfile.BadZipFile, zipfile.LargeZipFile, RuntimeError, EOFError) as exc:
                # RuntimeError: encrypted member; BadZipFile: CRC mismatch, i.e. a damaged archive.
                raise ModelError(f"{archive}: cannot unpack {info.filename!r} ({exc}); broken or tampered "
                                 "archive") from None


def _copy_folder(source: Path, target: Path, reporter: Reporter) -> None:
    files = []
    for dirpath, dirnames, filenames in os.walk(source):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                raise ModelError(f"{p} is a symbolic link; a model folder may only hold plain files (refused)")
            if name in filenames:
                if not p.is_file():
                    raise ModelError(f"{p} is not a plain file (refused)")
                files.append(p)
    total = sum(p.stat().st_size for p in files)
    if total > MAX_MODEL_BYTES:
        raise ModelError(f"{source} holds {total / 1e9:.1f} GB, more than a model may take (refused)")
    target.mkdir()
    for n, p in enumerate(files):
        reporter("copy model", n / max(len(files), 1))
        dest = target / p.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest)


def _load(folder: Path):
    """load_model, with a model.json that is not even text reported as a model problem rather than a crash."""
    try:
        return load_model(folder)
    except UnicodeDecodeError as exc:
        raise ModelError(f"model {folder.name}: unreadable {META_FILE} ({exc}); broken or tampered") from None


def _model_root(unpacked: Path, archive: Path) -> Path:
    """The folder holding model.json: the archive's top level, or its single top-level folder."""
    if (unpacked / META_FILE).is_file():
        return unpacked
    tops = [p for p in unpacked.iterdir() if p.name != "__MACOSX" and not p.name.startswith(".")]
    if len(tops) == 1 and tops[0].is_dir() and (tops[0] / META_FILE).is_file():
        return tops[0]
    raise ModelError(f"{archive} holds no model: {META_FILE} is neither at its top level nor in a single "
                     "top-level folder")


# ----------------------------------------------------------------------------------------------------------------
# public API


def import_model(source, dest_dir=None, overwrite: bool = False, reporter: Optional[Reporter] = None) -> Path:
    """Install a model folder or a .zip of one into `dest_dir` (default: the user models folder).

    The model lands under the (sanitised) `name` of its model.json. Raises BadInputError when `source` is not a
    folder or zip at all, ModelError when it is a model package that is broken, tampered, unsafe, named like a
    shipped model, or already installed (unless `overwrite`). Returns the installed folder.
    """
    reporter = reporter or Reporter()
    source = Path(source).expanduser()
    if not source.exists():
        raise BadInputError(f"{source} does not exist")
    if not source.is_dir() and not (source.is_file() and zipfile.is_zipfile(source)):
        raise BadInputError(f"{source} is neither a model folder nor a .zip of one")
    dest_dir = Path(dest_dir).expanduser() if dest_dir else user_models_dir()
    dest_dir.mkdir(parents=True, exist_ok=True)
    # Staging lives inside dest_dir so the final step is a rename on one file system; the model sits one level
    # down so that listings (which look at */model.json) never see a half-built one.
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=dest_dir))
    try:
        if source.is_dir():
            staged = staging / "model"
            _copy_folder(source, staged, reporter.sub(0.0, 0.5))
        else:
            unpacked = staging / "unpacked"
            unpacked.mkdir()
            _extract_zip(source, unpacked, reporter.sub(0.0, 0.5))
            staged = _model_root(unpacked, source)
        reporter("verify model", 0.6)
        try:
            model = _load(staged)  # the staged copy is what gets installed, so that is what is checked
        except ModelError as exc:
            raise ModelError(f"cannot import {source}: {exc}") from None
        name = safe_name(model.meta.get("name") or (source.name if source.is_dir() else source.stem))
        shipped = {e.get("id", "").lower() for e in shipped_entries()}
        if name.lower() in shipped:
            raise ModelError(f"model {name!r} has the name of a shipped model; rename it (the 'name' in its "
                             f"{META_FILE}) before importing")
        target = dest_dir / name
        reporter("install model", 0.9)
        if os.path.lexists(target) and not overwrite:
            raise ModelExistsError(f"a model named {name!r} is already installed in {dest_dir}; pass overwrite "
                                   "(--overwrite) to replace it")
        replace_folder(staged, target)  # the checked copy itself; a previous model stays until it is in place
        reporter("install model", 1.0)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fetch_model(url: str, sha256: str, dest_dir=None, reporter: Optional[Reporter] = None, timeout: float = 60,
                overwrite: bool = False) -> Path:
    """Download a model zip, check it against `sha256`, then install it as `import_model` does.

    The checksum comes from whoever published the model (not from the server that serves it), so a wrong or
    altered download is refused before anything is unpacked. `file://` URLs work, for offline use and tests.
    """
    reporter = reporter or Reporter()
    expected = _check_sha256(sha256)
    scheme = urllib.parse.urlparse(url).scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise BadInputError(f"cannot fetch {url!r}: only http, https and file URLs are supported")
    dest_dir = Path(dest_dir).expanduser() if dest_dir else user_models_dir()
    dest_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dest_dir))
    try:
        archive = staging / "model.zip"
        download = reporter.sub(0.0, 0.8)
        h = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(archive, "wb") as out:
                total = int(resp.headers.get("Content-Length") or 0)
                got = 0
                download("download model", 0.0)
                for chunk in iter(lambda: resp.read(_CHUNK), b""):
                    got += len(chunk)
                    if got > MAX_MODEL_BYTES:
                        raise ModelError(f"{url} is larger than {MAX_MODEL_BYTES / 1e9:.1f} GB; not a model "
                                         "(refused)")
                    h.update(chunk)
                    out.write(chunk)
                    download("download model", got / total if total else 0.0)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ModelError(f"could not download {url} ({reason})") from None
        if h.hexdigest() != expected:
            raise ModelError(f"download from {url} has sha256 {h.hexdigest()}, not the expected {expected} "
                             "(broken or tampered); nothing was installed")
        return import_model(archive, dest_dir=dest_dir, overwrite=overwrite, reporter=reporter.sub(0.8, 1.0))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def verify_registry() -> List[str]:
    """Problems with the shipped models (missing folder, wrong size or digest, bad entry); [] when intact."""
    path = shipped_registry_file()
    if not path.is_file():
        return [f"{path}: registry file missing"]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["models"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        return [f"{path}: unreadable registry ({exc})"]
    problems = []
    ids = [e.get("id") for e in entries if isinstance(e, dict)]
    if data.get("default") is not None and data["default"] not in ids:
        problems.append(f"default model {data['default']!r} is not in the registry")
    for dup in sorted({i for i in ids if i is not None and ids.count(i) > 1}):
        problems.append(f"model id {dup!r} is listed more than once")
    for n, e in enumerate(entries):
        if not isinstance(e, dict):
            problems.append(f"entry {n} is not an object")
            continue
        label = e.get("id", f"entry {n}")
        missing = [k for k in REGISTRY_FIELDS if k not in e]
        if missing:
            problems.append(f"{label}: entry lacks {', '.join(missing)}")
        rel = str(e.get("path", e.get("id", "")))
        if not rel:
            problems.append(f"{label}: entry names no model folder")
            continue
        try:
            folder = _member_path(path.parent, rel)
        except ModelError:
            problems.append(f"{label}: path {rel!r} points outside {path.parent}")
            continue
        if not folder.is_dir():
            problems.append(f"{label}: model folder {folder} is missing")
            continue
        if "size_bytes" in e and folder_size(folder) != e["size_bytes"]:
            problems.append(f"{label}: folder holds {folder_size(folder)} bytes, registry says {e['size_bytes']}")
        if "sha256" in e and folder_digest(folder) != e["sha256"]:
            problems.append(f"{label}: files do not match the registry sha256 (broken or tampered)")
        try:
            model = _load(folder)
        except ModelError as exc:
            problems.append(f"{label}: {exc}")
            continue
        for key in ("kind", "modality"):
            if key in e and e[key] != model.meta.get(key):
                problems.append(f"{label}: registry says {key} {e[key]!r}, {META_FILE} says "
                                f"{model.meta.get(key)!r}")
    return problems
