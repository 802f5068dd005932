#!/usr/bin/env python
"""Re-calibrate the shipped models on the healthy calibration split they were calibrated on, reproducibly: the
voxel table and curve come out as before (checked) and the lesion-level calibration (`calibration.findings`) is
added. Members go first; an ensemble is then re-pinned to its re-calibrated members and calibrated itself.
Model cards and training reports are kept; the registry's checksums and sizes are updated, its metrics kept.
With --contralateral W the (non-ensemble) models' post-processing first gets that contralateral weight
(core.template.contralateral_difference; 0 turns it off) and their version a minor step, since their maps change.
With --repin-only nothing is re-calibrated: the named models' registry checksums are brought up to date and every
ensemble or fusion naming one of them is pinned to its current folder (what a model card's edit needs, since the
card is part of the folder's checksum).

    python scripts/recalibrate_shipped.py [--data ../shared/data] [--model ID ...] [--contralateral W]
    python scripts/recalibrate_shipped.py --repin-only --model tissue-flair
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from BrainAnomalyLib.core.files import folder_digest, write_atomic  # noqa: E402
from BrainAnomalyLib.core.manifest import read_manifest  # noqa: E402
from BrainAnomalyLib.core.progress import Reporter  # noqa: E402
from BrainAnomalyLib.store.ensembles import build_ensemble  # noqa: E402
from BrainAnomalyLib.store.models import META_FILE, resolve_model, save_model, shipped_registry_file  # noqa: E402
from BrainAnomalyLib.training.run import calibrate, split_subjects  # noqa: E402


def healthy_cases(data: Path, modality: str, old: dict):
    """The scans the model was calibrated on: the subjects its record names, else its split of the IXI cohort."""
    cases = [c for c in read_manifest(data / "ixi_t1_2mm.csv", modality) if c.mask is None]
    if old.get("subjects"):
        return [c for c in cases if c.subject in set(old["subjects"])]
    split = old.get("split") or "calibration"
    return split_subjects(cases)[split] if split != "all" else cases


def folder_of(model_id: str) -> Path:
    return shipped_registry_file().parent / model_id


def meta_of(model_id: str) -> dict:
    # read directly: an ensemble whose members were just re-calibrated no longer loads until it is re-pinned
    return json.loads((folder_of(model_id) / META_FILE).read_text(encoding="utf-8"))


def repin(model_id: str) -> None:
    """Pin an ensemble to its members' current folders (their healthy scales are unchanged by re-calibration)."""
    meta = meta_of(model_id)
    members = [resolve_model(m["id"]) for m in meta["params"]["members"]]
    p = meta["params"]
    # Every setting of the rule is carried over: a re-pinned ensemble scores as before.
    meta["params"] = build_ensemble(members, p.get("weights") or (), p.get("rule") or "mean",
                                    float(p.get("contralateral") or 0.0), float(p.get("power") or 2.0),
                                    p.get("knees") or ())
    save_model(folder_of(model_id), meta, None, keep_files_of=folder_of(model_id))
    update_registry([model_id])


def repin_composites(model_ids) -> list:
    """Pin every shipped ensemble or fusion that names one of `model_ids` to that model's current folder, nothing
    else changed (its scales, weights and calibration stay), and update the registry for all of them. Returns the
    composites re-pinned."""
    update_registry(model_ids)
    digests = {i: folder_digest(folder_of(i)) for i in model_ids}
    registry = json.loads(shipped_registry_file().read_text(encoding="utf-8"))
    changed = []
    for entry in registry["models"]:
        meta = meta_of(entry["id"])
        members = (meta.get("params") or {}).get("members") or []
        stale = [m for m in members if isinstance(m, dict) and m.get("id") in digests
                 and m.get("sha256") != digests[m["id"]]]
        if not stale:
            continue
        for m in stale:
            m["sha256"] = digests[m["id"]]
        save_model(folder_of(entry["id"]), meta, None, keep_files_of=folder_of(entry["id"]))
        changed.append(entry["id"])
    if changed:
        update_registry(changed)
    return changed


def next_minor(version: str) -> str:
    major, minor, *_ = (version.split(".") + ["0", "0"])
    return f"{major}.{int(minor) + 1}.0"


def recalibrate(model_id: str, data: Path, contralateral: Optional[float] = None) -> None:
    model = resolve_model(model_id)
    changed = False
    # An ensemble mirrors its members' maps itself (its params; `brainanomaly ensemble --contralateral`).
    if contralateral is not None and model.kind != "ensemble" and \
            model.meta.get("postprocess", {}).get("contralateral", 0.0) != contralateral:
        model.meta = dict(model.meta, postprocess=dict(model.meta.get("postprocess", {}), contralateral=contralateral),
                          version=next_minor(model.meta.get("version", "1.0.0")))
        changed = True
    old = dict(model.meta.get("calibration") or {})
    cases = healthy_cases(data, model.modality, old)
    fprs = sorted(float(k) for k in old.get("thresholds", {})) or None
    t = time.perf_counter()
    record = calibrate(model, cases, Reporter(), None, *([fprs] if fprs else []))
    if old.get("thresholds"):
        # the same scans through the same code; preprocessing re-run outside the cache can move the last digits
        change = max(abs(record["thresholds"][k] - v) / max(abs(v), 1e-9) for k, v in old["thresholds"].items())
        # with a new contralateral weight the map itself changed, so the thresholds move by design
        what = "moved by up to" if changed else "reproduced within"
        print(f"{model_id}: voxel thresholds {what} {change:.1e} (relative)")
    keep = {k: old[k] for k in ("manifest", "modality", "split", "created_with") if k in old}
    meta = dict(model.meta, calibration=dict(record, **keep, seconds=round(time.perf_counter() - t, 1)))
    save_model(model.path, meta, model.tensors, keep_files_of=model.path)
    update_registry([model_id])
    f = meta["calibration"]["findings"]
    print(f"{model_id}: {f['per_scan']:.1f} findings per healthy scan at the {f['base_fpr']:.0%} base threshold "
          f"({f['n_scans']} scans)", flush=True)


def update_registry(model_ids) -> None:
    registry = shipped_registry_file()
    data = json.loads(registry.read_text(encoding="utf-8"))
    for entry in data["models"]:
        if entry["id"] in model_ids:
            folder = registry.parent / entry["path"]
            entry["sha256"] = folder_digest(folder)
            entry["version"] = meta_of(entry["id"]).get("version", entry.get("version"))
            entry["size_bytes"] = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    write_atomic(registry, json.dumps(data, indent=2) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--model", action="append", help="only these shipped models (default: every calibrated one)")
    ap.add_argument("--contralateral", type=float, help="set this contralateral weight in the models' post-processing "
                    "first (0-1; 0 = off)")
    ap.add_argument("--repin-only", action="store_true", help="re-calibrate nothing: update the named models' "
                    "checksums and pin the ensembles and fusions naming them to their current folders")
    args = ap.parse_args()
    if args.repin_only:
        if not args.model:
            ap.error("--repin-only needs --model ID (the models whose folders changed)")
        changed = repin_composites(args.model)
        print(f"re-pinned: {', '.join(changed) or 'nothing (already pinned)'}")
        return 0
    if args.contralateral is not None and not 0.0 <= args.contralateral < 1.0:
        ap.error("--contralateral must be in [0, 1): a weight of 1 erases a lesion with a mirror twin")
    registry = json.loads(shipped_registry_file().read_text(encoding="utf-8"))
    ids = args.model or [e["id"] for e in registry["models"]]
    calibrated = [i for i in ids if meta_of(i).get("calibration")]
    # members before ensembles: an ensemble pins its members' folders
    for model_id in sorted(calibrated, key=lambda i: meta_of(i)["kind"] == "ensemble"):
        if meta_of(model_id)["kind"] == "ensemble":
            repin(model_id)
        recalibrate(model_id, args.data, args.contralateral)
    skipped = sorted(set(ids) - set(calibrated))
    if skipped:
        print(f"not calibrated on healthy scans, left as they are: {', '.join(skipped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
