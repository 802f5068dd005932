#!/usr/bin/env python
"""Copy the measured metrics of each shipped model from a benchmark run (scripts/benchmark.py's JSON) into its
entry in Resources/Models/models.json, so the registry says what was measured, where and with which command.

    python scripts/record_metrics.py [docs/benchmark/latest.json]

Only the registry's "metrics" field changes; model folders, sizes and checksums stay as they are. A dataset the
benchmark measured replaces that dataset's entry; the model's other entries (a leave-one-case-out number, a model
the benchmark did not run) stay.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from BrainAnomalyLib.core.files import write_atomic  # noqa: E402
from BrainAnomalyLib.store.models import shipped_registry_file  # noqa: E402

KEEP = {"auprc": ("voxel", "auprc"), "auroc": ("voxel", "auroc"),
        "best_dice_upper_bound": ("voxel", "best_dice_upper_bound"),
        "dice_at_calibrated_threshold": ("voxel", "dice_at_threshold"), "healthy_fpr": ("healthy_fpr",),
        "nonlesion_fpr": ("nonlesion_fpr",), "scan_auroc": ("scan", "auroc"),
        "seconds_per_volume_cpu": ("seconds_per_volume",)}


def _get(row: dict, path):
    for key in path:
        if not isinstance(row, dict) or row.get(key) is None:
            return None
        row = row[key]
    return round(float(row), 4)


def metrics_by_model(rows: list, source: str) -> dict:
    out: dict = {}
    for row in rows:
        values = {k: _get(row, p) for k, p in KEEP.items()}
        values = {k: v for k, v in values.items() if v is not None}
        dataset = row["dataset"].split(" + ")[0].replace(" ", "_")  # "brats18_dev T1 + 23 healthy" -> brats18_dev_T1
        out.setdefault(row["scorer"], {})[dataset] = dict(values, source=source)
    return out


def named_for(entry: dict, metrics: dict) -> dict:
    """`metrics` keyed for the registry entry: a fusion's rows carry its reference contrast's manifest name
    ("brats18_dev_T1"), which is named here by every contrast it takes ("brats18_dev_T1+T2+FLAIR")."""
    inputs = entry.get("inputs") or []
    if len(inputs) < 2:
        return metrics
    out = {}
    for key, value in metrics.items():
        stem, _, modality = key.rpartition("_")
        out[f"{stem}_{'+'.join(inputs)}" if stem and modality in inputs else key] = value
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("benchmark", nargs="?", type=Path, default=ROOT / "docs" / "benchmark" / "latest.json")
    args = ap.parse_args()
    rows = json.loads(args.benchmark.read_text(encoding="utf-8"))
    source = f"python scripts/benchmark.py ({args.benchmark.resolve().relative_to(ROOT)})" \
        if args.benchmark.resolve().is_relative_to(ROOT) else f"python scripts/benchmark.py ({args.benchmark})"
    measured = metrics_by_model(rows, source)
    registry = shipped_registry_file()
    data = json.loads(registry.read_text(encoding="utf-8"))
    updated = []
    for entry in data["models"]:
        if entry["id"] in measured:
            entry["metrics"] = {**entry.get("metrics", {}), **named_for(entry, measured[entry["id"]])}
            updated.append(entry["id"])
    write_atomic(registry, json.dumps(data, indent=2) + "\n")  # every shipped model is listed here
    print(f"metrics recorded for {', '.join(updated) or 'no model'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
