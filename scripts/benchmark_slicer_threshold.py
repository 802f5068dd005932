"""Seconds for the module's live threshold on a BraTS-sized heatmap (240 x 240 x 155 at 1 mm), through the real
MRML nodes: the display-only preview a dragged slider triggers, and the full update on release (label map,
segmentation, lesion table), at a healthy voxel FPR and at a number of false findings per healthy scan (the
findings' scores and healthy rates on top). No model runs in any.

    python scripts/benchmark_slicer_threshold.py [--repeats 5]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for folder in (ROOT, ROOT / "BrainAnomaly"):
    sys.path.insert(0, str(folder))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    import numpy as np
    import SimpleITK as sitk
    import slicer
    from scipy import ndimage

    from BrainAnomalySlicer import nodes
    from BrainAnomalySlicer.logic import DetectionLogic, DetectionOptions

    scene = slicer.vtkMRMLScene()
    colours = slicer.vtkMRMLColorLogic()
    colours.SetMRMLScene(scene)
    rng = np.random.default_rng(0)
    # Smooth noise with a few strong blobs: many small components at loose thresholds, as real maps have.
    heat = ndimage.gaussian_filter(rng.standard_normal((155, 240, 240)).astype(np.float32), 2.0) * 8
    zz, yy, xx = np.mgrid[:155, :240, :240]
    for cz, cy, cx, r in ((70, 100, 90, 15), (90, 150, 160, 8), (40, 120, 120, 5)):
        heat += 10 * np.exp(-((zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r ** 2)).astype(np.float32)
    heat = np.maximum(heat, 0)
    image = sitk.GetImageFromArray(heat)
    image.SetSpacing((1.0, 1.0, 1.0))
    scan = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "scan")
    nodes.update_node_from_image(scan, image)
    fprs = [1e-4, 1e-3, 1e-2, 5e-2, 0.1, 0.5]
    qs = [float(np.quantile(heat, 1 - f)) for f in fprs]
    # For timing only, a finding calibration made of this map's own findings at the base threshold, as if ten
    # healthy scans had produced them.
    from BrainAnomalyLib.calibration import CalibrationCurve, FindingCalibration
    from BrainAnomalyLib.calibration.findings import FindingRule
    from BrainAnomalyLib.detection.postprocess import label_array

    curve = CalibrationCurve.from_dict({"fpr": fprs, "threshold": qs})
    _, own = label_array(heat, np.eye(4), qs[2], 0.05, rule=FindingRule(curve))
    healthy = FindingCalibration.from_scans([[les["finding_score"] for les in own]] + [[]] * 9)
    with tempfile.TemporaryDirectory() as tmp:
        sitk.WriteImage(image, str(Path(tmp) / "anomaly_map.nrrd"))
        (Path(tmp) / "result.json").write_text(json.dumps({
            "scan_calibration": curve.to_dict(), "finding_calibration": healthy.to_dict(),
            "display_range": [qs[2], qs[0]], "threshold": {"value": qs[2], "fpr": 0.01}, "lesions": []}),
            encoding="utf-8")
        logic = DetectionLogic(scene)
        t = time.perf_counter()
        out = logic.load_outputs(scan, tmp, DetectionOptions())
        load = time.perf_counter() - t
    preview, full, per_lesion, findings, base = [], [], [], [], []
    for k in range(args.repeats):
        t = time.perf_counter()
        found = logic.apply_threshold(out, false_findings=[0.2, 2.0][k % 2], per_lesion=False)
        findings.append(time.perf_counter() - t)
        t = time.perf_counter()  # the same voxels at a voxel threshold: what the findings' scores add
        logic.apply_threshold(out, fpr=0.01, per_lesion=False)
        base.append(time.perf_counter() - t)
        fpr = [0.002, 0.02][k % 2]
        t = time.perf_counter()
        logic.preview_threshold(out, fpr)
        preview.append(time.perf_counter() - t)
        t = time.perf_counter()
        result = logic.apply_threshold(out, fpr=fpr, per_lesion=False)
        full.append(time.perf_counter() - t)
        t = time.perf_counter()
        logic.apply_threshold(out, fpr=fpr, per_lesion=True)
        per_lesion.append(time.perf_counter() - t)
    print(f"volume 240x240x155; load outputs into nodes {load:.2f} s")
    print(f"preview (display threshold only): median {statistics.median(preview) * 1000:.1f} ms")
    print(f"apply (label map + one segment + table): median {statistics.median(full):.2f} s "
          f"({len(result['lesions'])} lesions at the last FPR)")
    print(f"apply with one segment per lesion: median {statistics.median(per_lesion):.2f} s")
    print(f"apply at a number of false findings (label map + one segment + table): median "
          f"{statistics.median(findings):.2f} s ({len(found['lesions'])} of {len(own)} findings at the last target), "
          f"against {statistics.median(base):.2f} s at the voxel threshold they are cut at (1 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
