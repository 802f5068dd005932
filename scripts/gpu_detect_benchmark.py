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

`e2e` (a GPU host that has SimpleITK and nibabel, carried as `gpu_detect_benchmark.sh carry` packs them): the real
`brainanomaly detect` command, timed whole (interpreter start-up, imports, reading, writing) and by step from its
result.json, with --device cuda (SimpleITK and torch registration) and --device cpu, runs interleaved after one cold
run; then the maps of the CUDA runs against the CPU run's, and the same detection repeated inside one process that
keeps the networks loaded (what a Slicer session or a cohort worker pays per scan after the first).
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

DEFAULT_SCAN_MANIFEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats18_dev.csv"


def first_t1(manifest: Path) -> Path:
    """The first T1 row's image of a manifest (paths relative to the manifest's folder)."""
    with open(manifest) as fh:
        row = next(r for r in csv.DictReader(fh) if r["modality"].upper() == "T1")
    return (manifest.parent / row["image"]).resolve()


def pack(args) -> int:
    import SimpleITK as sitk

    from BrainAnomalyLib.core.io import read_volume
    from BrainAnomalyLib.core.template import brain_mask_on_grid, template_on_grid
    from BrainAnomalyLib.detection.pipeline import Detector
    from BrainAnomalyLib.detection.postprocess import ijk_to_ras, label_array
    from BrainAnomalyLib.preprocess.bias import fit_n4
    from BrainAnomalyLib.preprocess.torch_grid import affine_matrix, image_matrix
    from BrainAnomalyLib.preprocess.working_scale import working_copy
    from BrainAnomalyLib.store.models import resolve_model

    path = args.scan
    if path is None:
        path = first_t1(DEFAULT_SCAN_MANIFEST)
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
    small, small_mask = working_copy(stripped, analysis_pre.native_mask, min(detector.grid.spacing))
    field, _ = fit_n4(small, small_mask, _reporter())
    voxels = sitk.GetArrayFromImage(field.apply(stripped))
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


# The detect command lines timed by `e2e`: the scoring device and the registration.
E2E_CONFIGS = {"cuda, SimpleITK registration": ("cuda", ("--registration", "affine")),
               "cuda, torch registration": ("cuda", ("--registration", "torch")),
               "cpu, SimpleITK registration": ("cpu", ("--registration", "affine"))}
E2E_REFERENCE = "cpu, SimpleITK registration"


def _map_agreement(a_dir: Path, b_dir: Path) -> dict:
    import SimpleITK as sitk

    a = sitk.GetArrayFromImage(sitk.ReadImage(str(next(a_dir.glob("anomaly_map.*"))))).ravel()
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(next(b_dir.glob("anomaly_map.*"))))).ravel()
    keep = (a != 0) | (b != 0)
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (a_dir, b_dir))
    return {"correlation": round(float(np.corrcoef(a[keep], b[keep])[0, 1]), 6),
            "max_abs_difference": round(float(np.abs(a - b).max()), 5),
            "findings": [len(ra.get("lesions", [])), len(rb.get("lesions", []))],
            "threshold": [ra.get("threshold", {}).get("value"), rb.get("threshold", {}).get("value")]}


def _in_process(scan_path: Path, model_name, device: str, repeats: int, registration: str = None,
                n4_threads: int = None) -> dict:
    """Detection repeated in one process with the networks loaded once: seconds per scan after the first.
    `registration` replaces the model's (torch: on `device`); `n4_threads` N4's fixed thread count (outputs then
    differ from the shipped chain's bytes: what a GPU host could gain by giving that up)."""
    from BrainAnomalyLib.core.io import read_volume
    from BrainAnomalyLib.detection.pipeline import Detector
    from BrainAnomalyLib.preprocess import bias
    from BrainAnomalyLib.preprocess.chain import PreprocessConfig
    from BrainAnomalyLib.store.models import default_model_name, resolve_model

    shipped = bias.N4_THREADS
    threads = n4_threads or shipped
    bias.N4_THREADS = threads
    try:
        model = resolve_model(model_name or default_model_name())
        config = PreprocessConfig.from_dict(model.meta.get("preprocessing", {}))
        if registration:
            config.registration = registration
        t = time.perf_counter()
        detector = Detector(model, device=device, preprocess_config=config)
        detector.prepare()
        load_s = time.perf_counter() - t
        scan = read_volume(scan_path)
        detector.run(scan)  # warm-up: kernels, allocator, template caches
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            result = detector.run(scan)
            runs.append({"total_s": time.perf_counter() - t, "timings": result.timings})
        return {"device": device, "registration": config.registration, "n4_threads": threads,
                "load_networks_s": round(load_s, 3),
                "per_scan_s": [round(r["total_s"], 3) for r in runs],
                "median_s": round(statistics.median(r["total_s"] for r in runs), 3),
                "last_timings_s": runs[-1]["timings"], "findings": len(result.lesions)}
    finally:
        bias.N4_THREADS = shipped  # the next variant starts from the shipped count


def warm(args) -> int:
    """What one process that keeps the networks pays per scan (the registration and N4 variants a GPU host could
    use), and what a new process pays before its first scan (imports)."""
    import subprocess

    import torch

    report = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "scan": str(args.scan),
              "imports_s": {}, "in_process": [], "errors": {}}
    for name, code in (("python", "pass"), ("torch", "import torch"), ("torch+cuda init", "import torch; "
                       "torch.zeros(1, device='cuda') if torch.cuda.is_available() else None"),
                       ("monai", "import monai"), ("SimpleITK", "import SimpleITK"),
                       ("BrainAnomalyLib.cli", "import BrainAnomalyLib.cli.main")):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=False)
        report["imports_s"][name] = round(time.perf_counter() - t, 3)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for registration, threads in (("affine", None), ("torch", None), ("torch", 16), ("affine", 16)):
        try:
            report["in_process"].append(_in_process(args.scan, args.model, device, args.repeats, registration,
                                                    threads))
        except Exception as exc:  # noqa: BLE001 - a benchmark reports what failed and goes on
            report["errors"][f"{registration} n4 {threads}"] = f"{type(exc).__name__}: {exc}"
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


def e2e(args) -> int:
    import os
    import shutil

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchmark_timing import timed_detect

    root = Path(__file__).resolve().parents[1]
    have_cuda = torch.cuda.is_available()
    configs = {k: v for k, v in E2E_CONFIGS.items() if have_cuda or v[0] == "cpu"}
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    report = {"gpu": torch.cuda.get_device_name(0) if have_cuda else None, "torch": torch.__version__,
              "cpu_cores": os.cpu_count(), "scan": str(args.scan), "model": args.model or "default",
              "repeats": args.repeats, "skull_strip": "auto", "errors": {}}

    def save():
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))

    first = next(iter(configs))
    try:  # the first command after a machine starts: files not yet cached, CUDA's first initialisation
        report["cold_run"] = {"config": first, **timed_detect(root, args.scan, args.work / "cold", args.model, "auto",
                                                              configs[first][0], configs[first][1])}
    except SystemExit as exc:
        report["errors"]["cold_run"] = str(exc)
    save()
    runs = {k: [] for k in configs}
    names = list(configs)
    for i in range(args.repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:  # rotated so no config always runs first
            out = args.work / f"{i}-{names.index(name)}"
            try:
                runs[name].append(timed_detect(root, args.scan, out, args.model, "auto", *configs[name]))
            except SystemExit as exc:
                report["errors"][f"{name} #{i}"] = str(exc)
            print(f"{name} #{i}: {runs[name][-1]['wall']:.2f} s" if runs[name] else f"{name} #{i}: failed",
                  file=sys.stderr, flush=True)
            if i < args.repeats - 1 and out.exists():
                shutil.rmtree(out)
        report["median"] = {n: {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]}
                            for n, rs in runs.items() if rs}
        report["runs"] = runs
        save()
    last = args.repeats - 1
    ref = args.work / f"{last}-{names.index(E2E_REFERENCE)}"
    report["maps_vs_cpu"] = {}
    for name in names:
        here = args.work / f"{last}-{names.index(name)}"
        if name != E2E_REFERENCE and here.exists() and ref.exists():
            report["maps_vs_cpu"][name] = _map_agreement(here, ref)
    save()
    for device in (["cuda"] if have_cuda else []) + ["cpu"]:
        try:
            report.setdefault("in_process", {})[device] = _in_process(args.scan, args.model, device, args.repeats)
        except Exception as exc:  # noqa: BLE001 - a benchmark reports what failed and goes on
            report["errors"][f"in_process {device}"] = f"{type(exc).__name__}: {exc}"
        save()
    medians = report.get("median", {})
    columns = [k for k in next(iter(medians.values()), {}) if k != "wall"]
    print("| config | wall s | " + " | ".join(columns) + " |")
    for name, med in medians.items():
        print(f"| {name} | {med['wall']:.2f} | " + " | ".join(f"{med[k]:.2f}" for k in columns) + " |")
    print(json.dumps({k: report[k] for k in ("maps_vs_cpu", "errors") if k in report}, indent=1))
    print(json.dumps(report.get("in_process", {}), indent=1))
    return 0 if not report["errors"] else 1


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
    c = sub.add_parser("e2e")
    c.add_argument("--scan", type=Path, required=True)
    c.add_argument("--model", default=None, help="default: the shipped default")
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--json", type=Path, required=True)
    c.add_argument("--work", type=Path, default=Path("/tmp/gpu_e2e"))
    w = sub.add_parser("warm")
    w.add_argument("--scan", type=Path, required=True)
    w.add_argument("--model", default=None, help="default: the shipped default")
    w.add_argument("--repeats", type=int, default=3)
    w.add_argument("--json", type=Path, required=True)
    args = p.parse_args()
    return {"pack": pack, "run": run, "e2e": e2e, "warm": warm}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
