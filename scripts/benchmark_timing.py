#!/usr/bin/env python
"""Per-volume wall time split by step, and peak memory, for one detection on CPU.

By default the volume is BraTS-sized (240 x 240 x 155 at 1 mm) and made from the bundled template with a
synthetic lesion, so the benchmark runs anywhere; --input times a file of your own. Skull-stripping is forced
through deepbet (the template is already stripped, which would otherwise skip the step).

    python scripts/benchmark_timing.py [--input scan.nii.gz] [--model normative-t1-ixi] [--repeats 3]
"""

import argparse
import json
import resource
import statistics
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", help="volume to time (default: a BraTS-sized synthetic case)")
    ap.add_argument("--model", default=None, help="model (default: the shipped default)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skull-strip", default="deepbet", choices=["auto", "deepbet", "none"])
    ap.add_argument("--json", help="write the timings here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp())
    path = Path(args.input) if args.input else tmp / "brats_sized.nii.gz"
    if not args.input:
        sitk.WriteImage(brats_sized_case(), str(path))
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
                "score+postprocess": tm["score+postprocess"], "back-project": tm["back_project"],
                "write outputs": write_s}
        step["total"] = sum(step.values())
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
