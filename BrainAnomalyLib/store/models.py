"""Model folders (model.json + model.safetensors) and the registry of shipped and user models.

A model is never unpickled: tensors are safetensors, everything else is JSON. Every file of a folder is listed
with its sha256 in model.json, and shipped models are listed with a folder digest in Resources/Models/models.json,
so a broken or tampered model is refused before use.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..core.errors import ModelError
from ..core.files import folder_digest, sha256_file, staged_folder

FORMAT = "brainanomaly-model"
FORMAT_VERSION = 1
TENSOR_FILE = "model.safetensors"
META_FILE = "model.json"


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

    @property
    def name(self) -> str:
        return self.meta.get("name", self.path.name)

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def modality(self) -> str:
        return self.meta["modality"]


def save_model(folder, meta: dict, tensors: Optional[Dict[str, np.ndarray]] = None) -> Path:
    """Write a model folder: built next to `folder` and swapped in whole, so a failure at any point (calibrating a
    model in place included) leaves the previous model as it was."""
    folder = Path(folder)
    with staged_folder(folder) as stage:
        meta = dict(meta, format=FORMAT, format_version=FORMAT_VERSION, files={})
        if tensors:
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(stage / TENSOR_FILE))
            meta["files"][TENSOR_FILE] = sha256_file(stage / TENSOR_FILE)
        (stage / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return folder


def load_model(folder, expected_digest: Optional[str] = None) -> Model:
    folder = Path(folder)
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


def resolve_model(name_or_path: Optional[str]) -> Model:
    """A model folder path, a shipped model id, or a model in the user folder."""
    name = name_or_path or default_model_name()
    p = Path(name).expanduser()
    if p.is_dir():
        return load_model(p)
    for e in shipped_entries():
        if e["id"] == name:
            return load_model(shipped_registry_file().parent / e["path"], expected_digest=e.get("sha256"))
    if (user_models_dir() / name).is_dir():
        return load_model(user_models_dir() / name)
    known = ", ".join(e["id"] for e in list_models()) or "none"
    raise ModelError(f"no model named {name!r} (available: {known})")
