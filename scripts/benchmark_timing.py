#!/usr/bin/env python
"""Per-volume wall time split by step, and peak memory, for one detection on CPU.

By default the volume is BraTS-sized (240 x 240 x 155 at 1 mm) and made from the bundled template with a
synthetic lesion, so the benchmark runs anywhere; --input times a file of your own. Skull-stripping is forced
through deepbet (the template is already stripped, which would otherwise skip the step).

    python scripts/benchmark_timing.py [--input scan.nii.gz] [--model normative-t1-ixi] [--repeats 3]

With --against REV the real `brainanomaly detect` command is timed instead, for this checkout and for REV (checked
out into a temporary git worktree), runs of the two alternating so both see the same machine load: per step (from
each run's result.json), the command's whole wall time including interpreter start-up and imports, and each run's
peak resident memory; also its CPU seconds (all threads), steadier than wall time when other work loads the machine.

    python scripts/benchmark_timing.py --against main --input scan.nii.gz --skull-strip auto --repeats 3
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from BrainAnomalyLib.synth.demo import make_demo_case  # noqa: E402
from BrainAnomalyLib.core.io import read_volume  # noqa: E402
from BrainAnomalyLib.store.models import resolve_model  # noqa: E402
from BrainAnomalyLib.detection.pipeline import Detector  # noqa: E402
from BrainAnomalyLib.preprocess.chain import PreprocessConfig  # noqa: E402
from BrainAnomalyLib.detection.writers import write_result  # noqa: E402


def brats_sized_case() -> sitk.Image:
    scan, _ = make_demo_case(angles_deg=(0, 0, 0), spacing=(1.0, 1.0, 1.0), origin_shift=(0, 0, 0))
    ref = sitk.Image([240, 240, 155], sitk.sitkFloat32)
    centre = scan.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in scan.GetSize()])
    ref.SetOrigin([c - (s - 1) / 2 for c, s in zip(centre, ref.GetSize())])
    return sitk.Resample(scan, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# result.json timing keys of each step of the table; "start-up, read, write" is what the command's wall time has
# beyond them (interpreter start-up, imports, model loading, reading the scan, writing the outputs).
STEPS = {"orient": ["preprocess.orient"], "skull-strip": ["preprocess.skull-strip"],
         "bias-correct": ["preprocess.bias-correct"], "register": ["preprocess.register"],
         "resample+normalise": ["preprocess.resample", "preprocess.sanity", "preprocess.contrast",
                                "preprocess.normalise"],
         "load networks": ["load_networks"], "score+postprocess": ["score+postprocess"],
         "back-project": ["back_project"]}
# Steps that ran on a thread beside the main one (not part of the wall time's sum): the networks' loading, which
# overlaps the preprocessing; "load networks" above is then what the main thread still waited for it.
BESIDE = {"load networks (beside)": ["load_networks_background"]}


def timed_detect(tree: Path, scan: Path, out: Path, model, skull_strip: str, device: str = "cpu",
                 extra: tuple = ()) -> dict:
    """Run `brainanomaly detect` from the checkout at `tree`; its step seconds, wall time and peak RSS (MB)."""
    cmd = [sys.executable, "-m", "BrainAnomalyLib.cli.main", "detect", str(scan), "-o", str(out), "--device", device,
           "-q", "--skull-strip", skull_strip, *extra] + (["--model", model] if model else [])
    # The checkout first, anything already on the path after it (a GPU host's carried packages).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])))
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"detect failed in {tree}: {err.strip().splitlines()[-1] if err.strip() else status}")
    timings = json.loads((out / "result.json").read_text())["timings"]
    step = {k: sum(timings.get(n, 0.0) for n in names) for k, names in STEPS.items()}
    step["start-up, read, write"] = wall - sum(step.values())
    step.update({k: sum(timings.get(n, 0.0) for n in names) for k, names in BESIDE.items()})
    step["wall"] = wall
    # CPU seconds of all the command's threads: on a loaded machine a steadier measure of the work than wall time
    step["cpu"] = usage.ru_utime + usage.ru_stime
    step["peak_rss_mb"] = usage.ru_maxrss / 1024.0
    return step


def against(rev: str, scan: Path, model, skull_strip: str, repeats: int, tmp: Path) -> dict:
    """Median per-step table of this checkout and of `rev`, measured interleaved."""
    here = Path(__file__).resolve().parent.parent
    old = tmp / "old"
    subprocess.run(["git", "-C", str(here), "worktree", "add", "--detach", str(old), rev], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = {"old": [], "new": []}
    try:
        for i in range(repeats + 1):  # the first pair warms the file cache; it is not counted
            for name, tree in (("old", old), ("new", here)) if i % 2 == 0 else (("new", here), ("old", old)):
                out = tmp / f"{name}{i}"
                step = timed_detect(tree, scan, out, model, skull_strip)
                shutil.rmtree(out)
                if i > 0:
                    runs[name].append(step)
                print(f"run {i} {name}: {step['wall']:.1f} s, {step['peak_rss_mb']:.0f} MB", file=sys.stderr)
    finally:
        subprocess.run(["git", "-C", str(here), "worktree", "remove", "--force", str(old)], check=False)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in runs.items()}
    print(f"\n`brainanomaly detect` on {scan.name}, skull-strip {skull_strip}, {rev} (old) against this checkout "
          f"(new), median of {repeats} interleaved runs each (+1 warm-up pair)\n")
    print("| step | old s | new s | new/old |")
    print("|---|---|---|---|")
    for k in med["old"]:
        o, n = med["old"][k], med["new"][k]
        unit = "MB" if k == "peak_rss_mb" else ""
        print(f"| {k}{' (' + unit + ')' if unit else ''} | {o:.2f} | {n:.2f} | {n / o if o else float('nan'):.2f} |")
    return {"rev": rev, "median": med, "runs": runs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", help="volume to time (default: a BraTS-sized synthetic case)")
    ap.add_argument("--model", default=None, help="model (default: the shipped default)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skull-strip", default="deepbet", choices=["auto", "deepbet", "none"])
    ap.add_argument("--json", help="write the timings here")
    ap.add_argument("--against", metavar="REV", help="time the detect command of this checkout against git REV's")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp())
    path = Path(args.input) if args.input else tmp / "brats_sized.nii.gz"
    if not args.input:
        sitk.WriteImage(brats_sized_case(), str(path))
    if args.against:
        table = against(args.against, path.resolve(), args.model, args.skull_strip, args.repeats, tmp)
        if args.json:
            Path(args.json).write_text(json.dumps(table, indent=2) + "\n")
        shutil.rmtree(tmp, ignore_errors=True)
        return 0
    model = resolve_model(args.model)
    pre = PreprocessConfig.from_dict(model.meta.get("preprocessing", {}))
    pre.skull_strip = args.skull_strip
    det = Detector(model, device="cpu", preprocess_config=pre)
    runs = []
    for i in range(args.repeats + 1):  # the first run loads deepbet and warms caches; it is not counted
        t = time.perf_counter()
        scan = read_volume(path)
        read_s = time.perf_counter() - t
        result = det.run(scan, modality=model.modality)
        t = time.perf_counter()
        write_result(result, scan, tmp / f"out{i}", input_name=path.name)
        write_s = time.perf_counter() - t
        tm = result.timings
        step = {"read": read_s, "orient": tm["preprocess.orient"], "strip": tm["preprocess.skull-strip"],
                "bias-correct": tm["preprocess.bias-correct"], "register": tm["preprocess.register"],
                "resample+normalise": tm["preprocess.resample"] + tm["preprocess.normalise"],
                "load networks": tm["load_networks"], "score+postprocess": tm["score+postprocess"],
                "back-project": tm["back_project"],
                "write outputs": write_s}
        step["total"] = sum(step.values())
        step["load networks (beside)"] = tm.get("load_networks_background", 0.0)
        if i > 0:
            runs.append(step)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    size = scan.GetSize()
    print(f"\nvolume {size[0]}x{size[1]}x{size[2]} at {scan.GetSpacing()} mm, model {model.name}, CPU, "
          f"median of {len(runs)} runs (+1 warm-up)\n")
    print("| step | seconds |")
    print("|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.2f} |")
    print(f"\npeak resident memory: {peak_rss_mb():.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps({"median_seconds": med, "peak_rss_mb": peak_rss_mb(),
                                               "size": size, "model": model.name}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
