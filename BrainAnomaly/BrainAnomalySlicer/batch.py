"""Batch detection through the module's logic, for `scripts/slicer_batch.py` (Slicer started headless) and for
anything else that has an MRML scene. Each case's files appear together in OUTDIR/<subject>/ or not at all."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Callable, List, Optional

from . import nodes
from .logic import DetectionError, DetectionLogic, DetectionOptions

CASE_FILES = ("anomaly_map.nrrd", "labels.nrrd", "anomalies.seg.nrrd", "lesions.csv", "result.json")
SUMMARY_COLUMNS = ("subject", "modality", "image", "status", "n_lesions", "anomalous_volume_ml", "threshold",
                   "fpr", "seconds", "message")


def _load_volume(scene, path: Path, name: str):
    from BrainAnomalyLib.core.io import read_volume

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    try:
        nodes.update_node_from_image(node, read_volume(path))
    except BaseException:
        nodes.remove_node(scene, node)
        raise
    return node


def _write(scene, node, storage_class: str, path: Path) -> None:
    storage = scene.AddNewNodeByClass(storage_class)
    try:
        storage.SetFileName(str(path))
        if storage_class == "vtkMRMLVolumeArchetypeStorageNode":
            storage.SetUseCompression(1)
        if not storage.WriteData(node):
            raise DetectionError(f"could not write {path.name}")
    finally:
        scene.RemoveNode(storage)


def save_case(scene, outputs: nodes.OutputNodes, state: dict, lesions: List[dict], folder: Path) -> None:
    """Heatmap and label map (NRRD), segmentation (.seg.nrrd), lesion table (CSV) and a JSON summary, staged in
    a hidden sibling and swapped in together: a case written again keeps its previous files until the new ones
    are complete."""
    from BrainAnomalyLib.core.files import staged_folder

    with staged_folder(folder) as stage:
        _write(scene, outputs.heatmap, "vtkMRMLVolumeArchetypeStorageNode", stage / "anomaly_map.nrrd")
        _write(scene, outputs.labelmap, "vtkMRMLVolumeArchetypeStorageNode", stage / "labels.nrrd")
        _write(scene, outputs.segmentation, "vtkMRMLSegmentationStorageNode", stage / "anomalies.seg.nrrd")
        _write(scene, outputs.table, "vtkMRMLTableStorageNode", stage / "lesions.csv")
        summary = {k: state.get(k) for k in ("model", "modality", "threshold", "fpr", "min_lesion_ml", "pred_score",
                                              "device", "timings", "notes")}
        summary["lesions"] = lesions
        (stage / "result.json").write_text(json.dumps(summary, indent=2) + "\n")


def run_batch(manifest, outdir, options: DetectionOptions, scene, modality: Optional[str] = None,
              python: Optional[str] = None, log: Callable[[str], None] = print,
              cancel_requested: Optional[Callable[[], bool]] = None) -> List[dict]:
    """Detect on every row of a manifest (rows of `modality`, default the model's); returns one summary row per
    case and writes OUTDIR/summary.csv. A failing case is reported and the batch goes on."""
    from BrainAnomalyLib.core.errors import BrainAnomalyError
    from BrainAnomalyLib.core.manifest import read_manifest
    from BrainAnomalyLib.store.models import resolve_model

    model = resolve_model(options.model)  # fail early on a missing or broken model
    modality = modality or options.modality or model.modality
    cases = read_manifest(manifest, modality)
    if not cases:
        raise DetectionError(f"no {modality} rows in {manifest}", kind="BadInputError", exit_code=2)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    logic = DetectionLogic(scene, python)
    rows = []
    for i, case in enumerate(cases, start=1):
        if cancel_requested is not None and cancel_requested():
            log("batch cancelled")
            break
        started = time.perf_counter()
        row = {"subject": case.subject, "modality": case.modality, "image": str(case.image)}
        created = []
        try:
            volume = _load_volume(scene, case.image, case.subject)
            created.append(volume)
            outputs = logic.detect(volume, DetectionOptions(**dict(vars(options), modality=case.modality)),
                                   cancel_requested=cancel_requested)
            created += list(outputs.nodes().values())
            state = logic.state(outputs)
            result = logic.apply_threshold(outputs)
            save_case(scene, outputs, state, result["lesions"], outdir / case.subject)
            row.update(status="ok", n_lesions=len(result["lesions"]),
                       anomalous_volume_ml=round(sum(les["volume_ml"] for les in result["lesions"]), 3),
                       threshold=round(result["threshold"], 5), fpr=result["fpr"], message="")
        except (DetectionError, BrainAnomalyError, nodes.NodeError, OSError, RuntimeError) as exc:
            row.update(status="failed", message=str(exc))
        finally:
            for node in created:
                nodes.remove_node(scene, node)
        row["seconds"] = round(time.perf_counter() - started, 2)
        rows.append(row)
        log(f"[{i}/{len(cases)}] {case.subject}: {row['status']}"
            + (f", {row['n_lesions']} lesion(s)" if row["status"] == "ok" else f" ({row['message']})"))
    with open(outdir / "summary.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in SUMMARY_COLUMNS})
    return rows
