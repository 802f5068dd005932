"""`brainanomaly demo`: a synthetic case from the bundled template, detected like any scan."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..core.errors import BadInputError
from ..core.progress import CancelToken, Reporter
from ..detection.request import DetectionRequest
from .detect import print_summary
from .progress_bar import ProgressBar


DEMO_FILES = ("demo_t1.nii.gz", "demo_truth.nii.gz")  # the demo's own scan and its truth, beside the outputs


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="build a synthetic case from the bundled template and detect its lesion")
    p.add_argument("-o", "--output", default="demo_output",
                   help="output folder (default demo_output): new or empty, or an earlier demo's, which is "
                        "replaced whole; a folder holding anything else (another result included) is refused")
    p.add_argument("--model", help="model to use (default: the shipped default model)")
    p.add_argument("--device", default="cpu", help="cpu (default) | auto | cuda")
    p.add_argument("-q", "--quiet", action="store_true")


def check_demo_output(out: Path) -> None:
    """The demo may replace its own earlier output (its scan is remade each time), nothing else."""
    from ..detection.writers import check_output, folder_contents

    earlier, _ = folder_contents(out, DEMO_FILES)
    if earlier and DEMO_FILES[0] not in earlier:
        raise BadInputError(f"the output folder {out.absolute()} holds an earlier result that is not a demo's; "
                            "choose a new or empty folder")
    check_output(out, overwrite=True, extra=DEMO_FILES)


def run(args, cancel: CancelToken) -> int:
    from ..core.io import write_volume
    from ..detection.pipeline import Detector
    from ..core.files import staged_folder
    from ..detection.writers import write_outputs
    from ..synth.demo import make_demo_case

    out = Path(args.output)
    check_demo_output(out)  # before anything is loaded or computed
    request = DetectionRequest.from_dict({"input": str(out / DEMO_FILES[0]), "output": str(out),
                                          "model": args.model, "modality": "T1", "device": args.device})
    det = Detector.from_request(request)  # a missing model fails before anything is written
    bar = ProgressBar(args.quiet, "demo")
    reporter = Reporter(bar, cancel)
    try:
        # Built aside and swapped in whole: a second demo into the same folder leaves no file of the first.
        with staged_folder(out) as stage:
            scan, truth = make_demo_case()
            write_volume(scan, stage / DEMO_FILES[0])
            write_volume(truth, stage / DEMO_FILES[1])
            one = dataclasses.replace(request, input=str(stage / DEMO_FILES[0]), output=str(stage))
            result, image = det.run_request(one, reporter.sub(0.0, 0.95))
            write_outputs(result, image, stage, input_name=DEMO_FILES[0], reporter=reporter.sub(0.95, 1.0))
    finally:
        bar.close()
    s = result.summary()
    print_summary(s, out)
    print(_demo_verdict(s, truth, out))
    return 0


def _demo_verdict(summary: dict, truth, out: Path) -> str:
    """Say which reported finding is the inserted lesion, and how it compares with the rest."""
    import numpy as np
    import SimpleITK as sitk

    true = sitk.GetArrayFromImage(truth) > 0
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "pred_mask.nii.gz"))) > 0
    ijk = np.argwhere(true).mean(axis=0)[::-1]
    centre = np.array(truth.TransformContinuousIndexToPhysicalPoint(ijk.tolist())) * [-1, -1, 1]
    lesions = summary["lesions"]
    hit = [k for k, les in enumerate(lesions) if np.linalg.norm(np.array(les["centroid_ras"]) - centre) < 10]
    overlap = 2 * (pred & true).sum() / max(pred.sum() + true.sum(), 1)
    if not hit:
        return f"demo lesion: NOT found at this threshold (Dice {overlap:.2f}); see {out / 'overlay.png'}"
    k = hit[0]
    others = [les["max_score"] for j, les in enumerate(lesions) if j != k]
    text = (f"demo lesion: found as finding #{k + 1} of {len(lesions)} (peak score {lesions[k]['max_score']:.1f}, "
            f"{lesions[k]['volume_ml']:.1f} mL vs {true.sum() * np.prod(truth.GetSpacing()) / 1000:.1f} mL "
            f"inserted)")
    if others:
        text += (f"; the other {len(others)} regions peak at {max(others):.1f} or less (the template-made demo scan's "
                 "contrast differs from the healthy scans the model learned from)")
    return text + f"; see {out / 'overlay.png'}"

