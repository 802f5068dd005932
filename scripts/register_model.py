#!/usr/bin/env python
"""Copy a trained model folder into Resources/Models and (re)write its registry entry with size and sha256.

    python scripts/register_model.py /path/to/model-folder [--default] [--half] [--version V] [--keep-metrics]
"""

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from BrainAnomalyLib.core.files import folder_digest, staged_folder, write_atomic  # noqa: E402
from BrainAnomalyLib.store.models import load_model, save_model, shipped_registry_file  # noqa: E402


def repack(folder: Path, half: bool = False, version: Optional[str] = None):
    """Re-write a model folder's tensors in half precision and/or with another version, in one pass, keeping its
    other files (card, training report) and otherwise its storage precision; the folder is swapped in whole, so a
    failure leaves the model as it was."""
    model = load_model(folder)
    meta = dict(model.meta, version=version) if version else model.meta
    save_model(folder, meta, model.tensors, half=True if half else None, keep_files_of=folder)
    return load_model(folder)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--default", action="store_true", help="make it the default model")
    ap.add_argument("--card", help="model card markdown file to copy in as MODEL_CARD.md (the shipped cards live in "
                         "their model folders: Resources/Models/NAME/MODEL_CARD.md)")
    ap.add_argument("--half", action="store_true",
                    help="store the float32 tensors as float16 (read back as float32): half the size; check the "
                         "model's scores before and after")
    ap.add_argument("--version", help="the version to ship it as (a retrained model replacing a shipped one: a new "
                         "major version; default: the folder's own, 1.0.0 for a freshly trained model)")
    ap.add_argument("--keep-metrics", action="store_true",
                    help="keep the registry's recorded metrics: for a model re-packed without changing its scores")
    args = ap.parse_args()
    model = load_model(args.folder)  # refuses broken folders before anything is copied
    if args.card and not Path(args.card).is_file():
        print(f"register_model: no model card at {args.card}", file=sys.stderr)
        return 2
    registry = shipped_registry_file()
    dest = registry.parent / model.name
    if dest.resolve() != args.folder.resolve():
        with staged_folder(dest) as stage:  # a registered model stays whole until its copy is complete
            shutil.copytree(args.folder, stage, dirs_exist_ok=True)
            if args.card:
                shutil.copy(args.card, stage / "MODEL_CARD.md")
    elif args.card and Path(args.card).resolve() != (dest / "MODEL_CARD.md").resolve():
        shutil.copy(args.card, dest / "MODEL_CARD.md")
    if args.half or args.version:
        model = repack(dest, args.half, args.version)
    data = (json.loads(registry.read_text(encoding="utf-8")) if registry.is_file()
            else {"default": model.name, "models": []})
    meta = model.meta
    entry = {"id": model.name, "path": model.name, "kind": meta["kind"], "version": meta.get("version", "1.0.0"),
             "modality": meta["modality"], "inputs": list(meta.get("inputs") or [meta["modality"]]),
             "description": meta.get("description", ""),
             "size_bytes": sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()),
             "sha256": folder_digest(dest),
             "training_data": meta.get("training_data", {}).get("manifest", "none"),
             "metrics": meta.get("metrics", {})}
    ids = [e["id"] for e in data["models"]]
    if args.keep_metrics and model.name in ids:
        entry["metrics"] = data["models"][ids.index(model.name)].get("metrics", {})
    if model.name in ids:  # re-registered: keep its place in the list
        data["models"][ids.index(model.name)] = entry
    else:
        data["models"].append(entry)
    if args.default:
        data["default"] = model.name
    write_atomic(registry, json.dumps(data, indent=2) + "\n")
    print(f"registered {model.name}: {entry['size_bytes']} bytes, sha256 {entry['sha256'][:12]}...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
