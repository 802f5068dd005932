"""Model folders (model.json + model.safetensors) and the registry of shipped and user models.

A model is never unpickled: tensors are safetensors, everything else is JSON. Every file of a folder is listed
with its sha256 in model.json, and shipped models are listed with a folder digest in Resources/Models/models.json,
so a broken or tampered model is refused before use. An ensemble (and a fusion of contrasts) holds no weights of its
own: it names each member by id with the member folder's digest, and loading it finds and checks each member the
same way.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..core.errors import ModelError
from ..core.files import folder_digest, sha256_file, staged_folder

FORMAT = "brainanomaly-model"
FORMAT_VERSION = 1
TENSOR_FILE = "model.safetensors"
META_FILE = "model.json"
# model.json's "storage_dtype" when the floating-point tensors were stored in half precision to keep the folder
# small; they are cast back to float32 on loading, so scorers always see float32.
HALF = "float16"
# Models made of other installed models (named by id and sha256 in params.members).
COMPOSITE_KINDS = ("ensemble", "fusion")


def resources_dir() -> Path:
    env = os.environ.get("BRAINANOMALY_RESOURCES")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "Resources"


def shipped_registry_file() -> Path:
    return resources_dir() / "Models" / "models.json"


def user_models_dir() -> Path:
    env = os.environ.get("BRAINANOMALY_MODELS_DIR")
    return Path(env) if env else Path.home() / ".brainanomaly" / "models"


@dataclass
class Model:
    path: Path
    meta: dict
    tensors: Dict[str, np.ndarray] = field(default_factory=dict)
    # An ensemble's or a fusion's members, found and checked when it is loaded; never written back into its folder.
    members: List["Model"] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.meta.get("name", self.path.name)

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def modality(self) -> str:
        return self.meta["modality"]


def save_model(folder, meta: dict, tensors: Optional[Dict[str, np.ndarray]] = None,
               half: Optional[bool] = None, keep_files_of=None) -> Path:
    """Write a model folder: built next to `folder` and swapped in whole, so a failure at any point (calibrating a
    model in place included) leaves the previous model as it was.

    `half` stores the float32 tensors as float16 (read back as float32); None keeps what `meta` says, so a model
    stored in half precision stays so when it is re-saved (e.g. recalibrated). `keep_files_of`, a model folder
    (the same one, or the one a copy is made from), hands on its other files: the model card, the training
    report."""
    folder = Path(folder)
    with staged_folder(folder) as stage:
        if keep_files_of is not None:
            source = Path(keep_files_of)
            for p in source.rglob("*"):
                rel = p.relative_to(source)
                if p.is_file() and rel.as_posix() not in (META_FILE, TENSOR_FILE):
                    (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(p, stage / rel)
        meta = dict(meta, format=FORMAT, format_version=FORMAT_VERSION, files={})
        if half is None:
            half = meta.get("storage_dtype") == HALF
        meta.pop("storage_dtype", None)
        if half and tensors:
            meta["storage_dtype"] = HALF
            tensors = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in tensors.items()}
        if tensors:
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(stage / TENSOR_FILE))
            meta["files"][TENSOR_FILE] = sha256_file(stage / TENSOR_FILE)
        (stage / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return folder


def load_model(folder, expected_digest: Optional[str] = None) -> Model:
    """A checked model folder; an ensemble or a fusion comes with its members, each found by id and checked against
    the digest it recorded."""
    model = _load_folder(Path(folder), expected_digest)
    if model.kind in COMPOSITE_KINDS:
        model.members = _load_members(model)
    return model


def _load_folder(folder: Path, expected_digest: Optional[str]) -> Model:
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise ModelError(f"{folder} is not a model folder (no {META_FILE})")
    if expected_digest is not None and folder_digest(folder) != expected_digest:
        raise ModelError(f"model {folder.name}: files do not match the registry checksum (broken or tampered)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError covers bad JSON and bytes that are not UTF-8
        raise ModelError(f"model {folder.name}: unreadable {META_FILE} ({exc})") from None
    if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelError(f"model {folder.name}: not a {FORMAT} v{FORMAT_VERSION} model")
    for key in ("kind", "modality", "grid"):
        if key not in meta:
            raise ModelError(f"model {folder.name}: {META_FILE} lacks '{key}'")
    tensors = {}
    for name, digest in meta.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise ModelError(f"model {folder.name}: missing file {name}")
        if sha256_file(path) != digest:
            raise ModelError(f"model {folder.name}: {name} does not match its checksum (broken or tampered)")
    if TENSOR_FILE in meta.get("files", {}):
        from safetensors.numpy import load_file

        try:
            tensors = load_file(str(folder / TENSOR_FILE))
        except Exception as exc:  # safetensors raises its own error types
            raise ModelError(f"model {folder.name}: cannot read {TENSOR_FILE} ({exc})") from None
        if meta.get("storage_dtype") == HALF:
            tensors = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in tensors.items()}
    from ..scorers import scorer_class

    try:
        cls = scorer_class(meta["kind"])
    except KeyError:
        raise ModelError(f"model {folder.name}: unknown scorer kind {meta['kind']!r}") from None
    if cls.needs_tensors and not tensors:
        raise ModelError(f"model {folder.name}: scorer {meta['kind']} needs {TENSOR_FILE}")
    return Model(folder, meta, tensors)


def shipped_entries() -> List[dict]:
    path = shipped_registry_file()
    if not path.is_file():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    return data.get("models", [])


def default_model_name() -> str:
    path = shipped_registry_file()
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return data.get("default", "intensity-t1")


def list_models() -> List[dict]:
    """Shipped models, then the user's folder; each entry says where it lives."""
    out = []
    for e in shipped_entries():
        out.append(dict(e, source="shipped", location=str(shipped_registry_file().parent / e["path"])))
    udir = user_models_dir()
    if udir.is_dir():
        for meta_path in sorted(udir.glob(f"*/{META_FILE}")):
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            # Same fields as a shipped entry (bar the digest, which would hash every file on each listing).
            out.append({"id": meta_path.parent.name, "kind": meta.get("kind"), "modality": meta.get("modality"),
                        "version": meta.get("version"), "description": meta.get("description", ""),
                        "inputs": list(meta.get("inputs") or [meta.get("modality")]),
                        "size_bytes": sum(p.stat().st_size for p in meta_path.parent.rglob("*") if p.is_file()),
                        "source": "user", "location": str(meta_path.parent)})
    return out


def installed_folder(name: str) -> Optional[Tuple[Path, Optional[str]]]:
    """(folder, registry digest) of the shipped model with id `name`, else of the user's model of that name (no
    registry digest); None when neither exists."""
    for e in shipped_entries():
        if e["id"] == name:
            return shipped_registry_file().parent / e["path"], e.get("sha256")
    if name not in ("", ".", "..") and Path(name).name == name and (user_models_dir() / name).is_dir():
        return user_models_dir() / name, None
    return None


def installed_id(folder: Path) -> Optional[str]:
    """The id under which `folder` (or an identical copy of it) is installed, i.e. how an ensemble can name it."""
    folder = Path(folder).resolve()
    for e in shipped_entries():
        if (shipped_registry_file().parent / e["path"]).resolve() == folder:
            return e["id"]
    found = installed_folder(folder.name)
    if found and (found[0].resolve() == folder or folder_digest(found[0]) == folder_digest(folder)):
        return folder.name
    return None


def resolve_model(name_or_path: Optional[str]) -> Model:
    """A model folder path, a shipped model id, or a model in the user folder."""
    name = name_or_path or default_model_name()
    p = Path(name).expanduser()
    if p.is_dir():
        return load_model(p)
    found = installed_folder(name)
    if found:
        return load_model(found[0], expected_digest=found[1])
    known = ", ".join(e["id"] for e in list_models()) or "none"
    raise ModelError(f"no model named {name!r} (available: {known})")


def _load_members(ensemble: Model) -> List[Model]:
    """Each member named by an ensemble or fusion, found as an installed model (never as a path relative to the
    working folder) and refused unless its folder digest is the one recorded when it was built: a member that was
    retrained or recalibrated since no longer matches the scale its map was put on. A fusion's members also say
    which contrast they score, and need a healthy scale only when the fusion uses it."""
    params = ensemble.meta.get("params")
    refs = params.get("members") if isinstance(params, dict) else None
    fusion = ensemble.kind == "fusion"
    if not isinstance(refs, list) or len(refs) < 2:
        raise ModelError(f"model {ensemble.name}: an {ensemble.kind} names at least two members in its {META_FILE}")
    weights = params.get("weights")
    if weights is not None and not (isinstance(weights, list) and len(weights) == len(refs)
                                    and all(_is_number(w) and w >= 0 for w in weights) and sum(weights) > 0):
        raise ModelError(f"model {ensemble.name}: its weights are not {len(refs)} non-negative numbers")
    members = []
    for n, ref in enumerate(refs):
        member_id = ref.get("id") if isinstance(ref, dict) else None
        digest = ref.get("sha256") if isinstance(ref, dict) else None
        if not isinstance(member_id, str) or not isinstance(digest, str) or not member_id:
            raise ModelError(f"model {ensemble.name}: member {n + 1} is not named by id and sha256 (an ensemble "
                             "from an older version?); rebuild it with 'brainanomaly ensemble'")
        scale = ref.get("scale")
        if (not fusion or params.get("scale") == "healthy") and not (
                isinstance(scale, dict) and _is_number(scale.get("median")) and _is_number(scale.get("mad"))
                and scale["mad"] > 0):
            raise ModelError(f"model {ensemble.name}: member {member_id!r} has no healthy scale (median, mad > 0)")
        found = installed_folder(member_id)
        if found is None:
            raise ModelError(f"model {ensemble.name}: member {member_id!r} is not installed (neither a shipped "
                             f"model nor in {user_models_dir()}); install it with 'brainanomaly models import'")
        if folder_digest(found[0]) != digest:
            raise ModelError(f"model {ensemble.name}: member {member_id!r} ({found[0]}) does not match the sha256 "
                             f"the {ensemble.kind} recorded (changed, recalibrated or tampered with since); rebuild "
                             "it")
        try:
            member = _load_folder(found[0], None)
        except ModelError as exc:
            raise ModelError(f"model {ensemble.name}: member {member_id!r}: {exc}") from None
        if member.kind in COMPOSITE_KINDS:
            raise ModelError(f"model {ensemble.name}: member {member_id!r} is an {member.kind} itself")
        if fusion and ref.get("modality") != member.modality:
            raise ModelError(f"model {ensemble.name}: member {member_id!r} is a {member.modality} model but is "
                             f"named for {ref.get('modality')!r}")
        members.append(member)
    if fusion and len({m.modality for m in members}) < len(members):
        raise ModelError(f"model {ensemble.name}: a fusion has one member per contrast")
    return members


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)
