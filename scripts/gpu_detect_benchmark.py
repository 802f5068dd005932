"""Detection timed on a GPU, step by step, from a pack made here (scripts/gpu_detect_benchmark.sh drives it).

`pack` (here, with SimpleITK): runs `detect` on the CPU for one scan (the default model) and stores what the GPU
host cannot make without SimpleITK/nibabel: the stripped, N4-corrected voxels and their geometry, the brain mask,
the template on the model grid, SimpleITK's registration and the CPU result (threshold, findings at that voxel
threshold, step times).

`run` (the GPU host: torch, numpy, scipy, MONAI; no SimpleITK): the detection steps that follow skull-stripping
and N4, all on --device: the torch affine registration, resampling onto the model grid, standardisation, scoring,
map cleaning, back-projection, then the threshold and the lesion table on the CPU. One warm-up, then the median
of --repeats runs per step and of their sum ("end_to_end_s"). Not in that sum (stated in the JSON): reading and
writing files, skull-stripping (the BraTS scans are stripped already: `auto` only checks) and N4, which stays on
the CPU (the pack's CPU seconds for it are reported next to it).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_SCAN_MANIFEST = Path("/work/verify/brats_T1.csv")


def pack(args) -> int:
    import SimpleITK as sitk

    from BrainAnomalyLib.core.io import read_volume
    from BrainAnomalyLib.core.template import brain_mask_on_grid, template_on_grid
    from BrainAnomalyLib.detection.pipeline import Detector
    from BrainAnomalyLib.detection.postprocess import ijk_to_ras, label_array
    from BrainAnomalyLib.preprocess.bias import n4_correct
    from BrainAnomalyLib.preprocess.torch_grid import affine_matrix, image_matrix
    from BrainAnomalyLib.store.models import resolve_model

    path = args.scan
    if path is None:
        with open(DEFAULT_SCAN_MANIFEST) as fh:
            path = Path(next(csv.DictReader(fh))["image"])
    model = resolve_model(args.model)
    detector = Detector(model, device="cpu")
    scan = read_volume(path)
    started = time.perf_counter()
    # Detector.run's steps, keeping the analysis: its transform and masks are what the result was made from.
    analysis = detector.analyse(scan)
    result = detector.to_result(scan, analysis, detector.for_scan(detector.threshold(), analysis), "T1")
    cpu_total = time.perf_counter() - started
    analysis_pre = analysis.pre
    # The device starts from the stripped, N4-corrected scan (N4 stays on the CPU; its seconds are reported).
    arr = sitk.GetArrayFromImage(scan)
    stripped = sitk.GetImageFromArray(np.where(analysis_pre.native_mask, arr, 0).astype(np.float32))
    stripped.CopyInformation(scan)
    voxels = sitk.GetArrayFromImage(n4_correct(stripped, analysis_pre.native_mask, _reporter())[0])
    # The device's findings are the voxel threshold's components (no lesion-level rule: that needs the whole
    # Detector); the CPU result's, found the same way, are what they are compared with.
    _, plain = label_array(sitk.GetArrayFromImage(result.anomaly_map), ijk_to_ras(scan), result.threshold["value"],
                           result.min_lesion_ml)
    grid = detector.grid
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out, scan=voxels, scan_matrix=image_matrix(scan), index_to_ras=ijk_to_ras(scan),
        native_mask=np.packbits(analysis_pre.native_mask), native_shape=np.array(arr.shape),
        template=sitk.GetArrayFromImage(template_on_grid(grid)).astype(np.float32),
        template_mask=np.packbits(brain_mask_on_grid(grid)), grid_matrix=image_matrix(grid.reference()),
        sitk_transform=affine_matrix(analysis_pre.transform),
        meta=np.array(json.dumps({
            "model": model.name, "scan": str(path), "threshold": result.threshold["value"],
            "min_lesion_ml": result.min_lesion_ml, "cpu_total_s": round(cpu_total, 3), "cpu_timings": result.timings,
            "cpu_findings": len(plain), "cpu_finding_voxels": [les["voxels"] for les in plain],
            "cpu_pred_score": result.pred_score})))
    print(f"{args.out}: {args.out.stat().st_size / 2**20:.1f} MiB; CPU detect {cpu_total:.1f} s, "
          f"{len(result.lesions)} findings")
    return 0


def _reporter():
    from BrainAnomalyLib.core.progress import Reporter

    return Reporter()


def run(args) -> int:
    import torch

    from BrainAnomalyLib.detection.postprocess import PostprocessConfig, label_array, scan_score
    from BrainAnomalyLib.detection.torch_postprocess import postprocess
    from BrainAnomalyLib.preprocess import torch_grid
    from BrainAnomalyLib.preprocess.torch_register import register_arrays
    from BrainAnomalyLib.scorers import scorer_class
    from BrainAnomalyLib.store.models import resolve_model

    data = np.load(args.pack)
    meta = json.loads(str(data["meta"]))
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = resolve_model(meta["model"])
    scorer = scorer_class(model.kind).for_model(model, dict(model.meta.get("params", {})), device)
    post = PostprocessConfig(**model.meta.get("postprocess", {}))
    method = model.meta.get("preprocessing", {}).get("normalisation", "median-iqr")
    shape = tuple(int(v) for v in data["native_shape"])
    unpack = lambda name, like: np.unpackbits(data[name])[:int(np.prod(like))].reshape(like).astype(bool)  # noqa
    native_mask = unpack("native_mask", shape)
    grid_shape = data["template"].shape
    template_mask = unpack("template_mask", grid_shape)
    scan_m, grid_m, ras = data["scan_matrix"], data["grid_matrix"], data["index_to_ras"]
    stripped = data["scan"].astype(np.float32)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def once() -> tuple[dict, dict]:
        times, out = {}, {}

        def step(name, fn):
            sync()
            t = time.perf_counter()
            value = fn()
            sync()
            times[name] = time.perf_counter() - t
            return value

        scan_t, mask_t = step("upload", lambda: (torch.as_tensor(stripped, device=device),
                                                 torch.as_tensor(native_mask, device=device)))
        fixed_t = torch.as_tensor(data["template"], device=device)
        fixed_mask_t = torch.as_tensor(template_mask, device=device)
        matrix, info = step("register (torch)", lambda: register_arrays(scan_t, scan_m, mask_t, fixed_t, grid_m,
                                                                        fixed_mask_t))
        raw = step("resample", lambda: torch_grid.resample(scan_t, scan_m, grid_m, grid_shape, matrix))
        grid_mask = step("resample mask", lambda: torch_grid.resample(mask_t.to(torch.uint8), scan_m, grid_m,
                                                                      grid_shape, matrix, nearest=True) > 0)
        image, _ = step("normalise", lambda: torch_grid.normalise(raw, grid_mask, method))
        image_np, mask_np = step("download grid", lambda: (image.cpu().numpy(), grid_mask.cpu().numpy()))
        scored = step("score", lambda: scorer.score(image_np, mask_np, _reporter()))
        clean, eroded, _ = step("postprocess", lambda: postprocess(scored.anomaly_map, mask_np, post, device))
        heat = step("back-project", lambda: torch.where(mask_t, torch_grid.resample(
            torch.as_tensor(clean, device=device), grid_m, scan_m, shape, np.linalg.inv(matrix)), 0.0).cpu().numpy())
        _, lesions = step("findings", lambda: label_array(heat, ras, meta["threshold"], meta["min_lesion_ml"]))
        out.update(matrix=matrix, ncc=info["ncc_per_level"], lesions=lesions, score=scan_score(clean, eroded),
                   fixed_mask_t=fixed_mask_t, mask_t=mask_t)
        return times, out

    once()  # warm-up: CUDA kernels, cuDNN choices, the allocator
    runs = [once() for _ in range(args.repeats)]
    steps = {k: round(statistics.median(r[0][k] for r in runs), 4) for k in runs[0][0]}
    totals = [sum(r[0].values()) for r in runs]
    last = runs[-1][1]

    def on_grid(matrix):
        return torch_grid.resample(last["mask_t"].to(torch.uint8), scan_m, grid_m, grid_shape, matrix,
                                   nearest=True) > 0

    a, b = on_grid(data["sitk_transform"]), on_grid(last["matrix"])
    dice = float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1))
    report = {
        "device": device, "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "torch": torch.__version__, "model": meta["model"], "scan": meta["scan"], "repeats": args.repeats,
        "end_to_end_s": round(statistics.median(totals), 3), "end_to_end_runs_s": [round(t, 3) for t in totals],
        "steps_median_s": steps,
        "measured": "from the stripped scan's voxels in memory to the lesion table: torch registration, "
                    "resampling, standardisation, scoring, cleaning, back-projection on the device; threshold and "
                    "components on the CPU",
        "not_measured": {"file reading and writing": None, "skull-strip check (scan already stripped)": None,
                         "N4 bias correction (CPU; seconds in the pack's CPU run)":
                             meta["cpu_timings"].get("preprocess.bias-correct")},
        "registration_dice_vs_simpleitk": round(dice, 4), "registration_ncc_per_level": last["ncc"],
        "findings": {"device": len(last["lesions"]), "cpu_detect": meta["cpu_findings"],
                     "device_voxels": [les["voxels"] for les in last["lesions"]],
                     "cpu_voxels": meta["cpu_finding_voxels"]},
        "scan_score": {"device": round(last["score"], 4), "cpu_detect": round(meta["cpu_pred_score"], 4)},
        "cpu_detect_here": {"total_s": meta["cpu_total_s"], "timings_s": meta["cpu_timings"]},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--scan", type=Path, default=None, help=f"default: the first scan of {DEFAULT_SCAN_MANIFEST}")
    a.add_argument("--model", default="ensemble-t1-ixi")
    a.add_argument("--out", type=Path, default=Path("build/gpu/detect_pack.npz"))
    b = sub.add_parser("run")
    b.add_argument("--pack", type=Path, default=Path("build/gpu/detect_pack.npz"))
    b.add_argument("--device", default="auto")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--json", type=Path, required=True)
    args = p.parse_args()
    return pack(args) if args.command == "pack" else run(args)


if __name__ == "__main__":
    sys.exit(main())
