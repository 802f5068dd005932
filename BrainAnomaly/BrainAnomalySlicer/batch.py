"""Batch detection through the module's logic, for `scripts/slicer_batch.py` (Slicer started headless) and for
anything else that has an MRML scene. Each case's files (the one layout of BrainAnomalyLib/detection/writers.py,
as NRRD) appear together in OUTDIR/<subject>/ or not at all. OUTDIR follows the writer's output folder rule
(writers.check_output, checked before the model is loaded): new or empty, or holding only an earlier batch run,
which `overwrite` replaces whole at the end."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Callable, List, Optional

from . import nodes
from .logic import DetectionError, DetectionLogic, DetectionOptions

# threshold and fpr: the voxel threshold the findings were cut at; false_findings: the lesion-level operating point
# (empty for a voxel threshold).
SUMMARY_COLUMNS = ("subject", "modality", "image", "status", "n_lesions", "anomalous_volume_ml", "threshold",
                   "fpr", "false_findings", "seconds", "message")


def _load_volume(scene, path: Path, name: str):
    """The scan as a volume node (the module's input) and as the image it was read into."""
    from BrainAnomalyLib.core.io import read_volume

    image = read_volume(path)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    try:
        nodes.update_node_from_image(node, image)
    except BaseException:
        nodes.remove_node(scene, node)
        raise
    return node, image


def save_case(result, scan, folder: Path, input_name: str = "") -> None:
    """The case's outputs through the one writer every front end uses, which builds them beside the case folder
    and swaps them in whole: a case written again keeps its previous files until the new set is complete, and no
    stale file stays."""
    from BrainAnomalyLib.detection.writers import write_result

    write_result(result, scan, folder, "nrrd", input_name, overwrite=True)


def _detect(logic: DetectionLogic, volume, options: DetectionOptions, cancel_requested):
    """Run the worker on a volume node and read back the Result it wrote."""
    from BrainAnomalyLib.detection.writers import read_result

    run = logic.start(volume, options)
    try:
        run.wait(cancel_requested)
        run.raise_for_state()
        return read_result(run.output_dir)
    except BaseException:
        run.cancel()
        raise
    finally:
        run.cleanup()


def run_batch(manifest, outdir, options: DetectionOptions, scene, modality: Optional[str] = None,
              python: Optional[str] = None, log: Callable[[str], None] = print,
              cancel_requested: Optional[Callable[[], bool]] = None, overwrite: bool = False) -> List[dict]:
    """Detect on every row of a manifest (rows of `modality`, default the model's); returns one summary row per
    case and writes OUTDIR/summary.csv, where rows of other modalities are listed as skipped. A failing case is
    reported and the batch goes on."""
    from BrainAnomalyLib.core.manifest import read_manifest, skipped_rows
    from BrainAnomalyLib.detection.writers import check_output, output_root
    from BrainAnomalyLib.store.models import resolve_model

    outdir = Path(outdir)
    check_output(outdir, overwrite, cases=True)  # before the model is loaded
    model = resolve_model(options.model)  # fail early on a missing or broken model
    modality = modality or options.modality or model.modality
    skipped = []
    cases = read_manifest(manifest, modality, skipped)
    if not cases:
        raise DetectionError(f"no {modality} rows in {manifest}", kind="BadInputError", exit_code=2)
    why = f"this batch is for {modality}"
    if skipped:
        log(skipped_rows(skipped, len(cases) + len(skipped), why))
    rows = [{"subject": c.subject, "modality": c.modality, "image": str(c.image), "status": "skipped",
             "message": f"modality {c.modality}, {why}"} for c in skipped]
    with output_root(outdir, overwrite, cases=True) as root:
        rows += _run_cases(cases, root, options, scene, python, log, cancel_requested)
        with open(root / "summary.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: row.get(k, "") for k in SUMMARY_COLUMNS})
    return rows


def _run_cases(cases, root: Path, options: DetectionOptions, scene, python, log, cancel_requested) -> List[dict]:
    from BrainAnomalyLib.core.errors import BrainAnomalyError

    logic = DetectionLogic(scene, python)
    rows = []
    for i, case in enumerate(cases, start=1):
        if cancel_requested is not None and cancel_requested():
            log("batch cancelled")
            break
        started = time.perf_counter()
        row = {"subject": case.subject, "modality": case.modality, "image": str(case.image)}
        volume = None
        try:
            volume, scan = _load_volume(scene, case.image, case.subject)
            result = _detect(logic, volume, DetectionOptions(**dict(vars(options), modality=case.modality)),
                             cancel_requested)
            save_case(result, scan, root / case.subject, Path(case.image).name)
            row.update(status="ok", n_lesions=len(result.lesions),
                       anomalous_volume_ml=round(sum(les["volume_ml"] for les in result.lesions), 3),
                       threshold=round(result.threshold["value"], 5), fpr=result.threshold.get("fpr"),
                       false_findings=result.threshold.get("false_findings"), message="")
        except (DetectionError, BrainAnomalyError, nodes.NodeError, OSError, RuntimeError) as exc:
            row.update(status="failed", message=str(exc))
        finally:
            if volume is not None:
                nodes.remove_node(scene, volume)
        row["seconds"] = round(time.perf_counter() - started, 2)
        rows.append(row)
        log(f"[{i}/{len(cases)}] {case.subject}: {row['status']}"
            + (f", {row['n_lesions']} lesion(s)" if row["status"] == "ok" else f" ({row['message']})"))
    return rows
