#!/usr/bin/env python
"""Write a fusion model (scorers/fusion.py): installed models, one per contrast of a subject, scored together on one
registration and fused into one map, calibrated on synthetic healthy sessions made from the template.

    python scripts/make_fusion_model.py -o build/models/fusion-brats-dev \\
        --member T1=dpa-t1-ixi:1:0.75 --member T2=tissue-t2:0.5:0.5 --member FLAIR=tissue-flair:1:0.25

Each --member is MODALITY=model-id[:weight[:contralateral]]: the member's weight in the fused mean and the share of
its map's mirror image subtracted before its median filter (PostprocessConfig.contralateral; left out, the member's
own, e.g. tissue-t2's 0.5; 0 turns it off). --optional names
contrasts a session may lack. The first member is the model's modality, the contrast a manifest is evaluated on
(T1, when a member, must come first: it is registered first when given).

No healthy multi-contrast cohort is at hand, so, as for the tissue models (scripts/make_tissue_model.py), the
thresholds come from N_SCANS synthetic healthy sessions: for each, every contrast rendered from the template's
tissue maps with one shared misregistration shift, bias field and noise draw (synth.appearance.healthy_template_scan;
a healthy T1CE has T1's tissue signals there), scored and post-processed as detection does, through the code of
`brainanomaly calibrate`. The fused score is relative to each scan (each member's map in its own robust units), so
what the synthetic sessions fix is the shape of the healthy tail of the fused map.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from BrainAnomalyLib.core.manifest import normalise_modality  # noqa: E402
from BrainAnomalyLib.core.progress import Reporter  # noqa: E402
from BrainAnomalyLib.core.template import Grid  # noqa: E402
from BrainAnomalyLib.detection.postprocess import PostprocessConfig  # noqa: E402
from BrainAnomalyLib.preprocess.chain import PreprocessConfig  # noqa: E402
from BrainAnomalyLib.store.ensembles import build_fusion  # noqa: E402
from BrainAnomalyLib.store.models import load_model, resolve_model, save_model  # noqa: E402
from BrainAnomalyLib.synth.appearance import healthy_template_scan  # noqa: E402
from BrainAnomalyLib.training.run import base_meta, calibrate_volumes  # noqa: E402

N_SCANS = 12


def parse_member(text: str):
    modality, _, rest = text.partition("=")
    parts = rest.split(":")
    if not modality or not parts[0]:
        raise SystemExit(f"--member {text!r}: expected MODALITY=model-id[:weight[:contralateral]]")
    weight = float(parts[1]) if len(parts) > 1 else 1.0
    contralateral = float(parts[2]) if len(parts) > 2 else None
    return normalise_modality(modality), parts[0], weight, contralateral


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--member", action="append", required=True, help="MODALITY=model-id[:weight[:contralateral]]")
    ap.add_argument("--optional", action="append", default=[], help="a contrast a session may lack; repeat")
    ap.add_argument("--rule", default="mean", choices=("mean", "rms"),
                    help="how the members' maps are put together (scorers/fusion.py)")
    ap.add_argument("--power", type=float, default=2.0, help="the rms rule's power")
    ap.add_argument("--median", type=int, default=1, help="median filter of the fused map (members filter their own)")
    ap.add_argument("--description", default="")
    ap.add_argument("-o", "--output", required=True, type=Path)
    args = ap.parse_args()
    members = [parse_member(m) for m in args.member]
    models = [(m, resolve_model(i)) for m, i, _, _ in members]
    params = build_fusion(models, weights=[w for _, _, w, _ in members],
                          postprocess=[None if c is None else {"contralateral": c} for _, _, _, c in members],
                          optional=args.optional, rule=args.rule, power=args.power)
    grid = Grid()
    modalities = [m for m, _, _, _ in members]
    fused = ", ".join(f"{i} ({m}, weight {w:g}" + (f", contralateral {c:g}" if c else "") + ")"
                      for m, i, w, c in members) + ("" if args.rule == "mean" else f" by rms (power {args.power:g})")
    meta = base_meta("fusion", args.output.name, modalities[0],
                     args.description or f"fusion of {fused}; calibrated on {N_SCANS} synthetic healthy sessions",
                     grid, PreprocessConfig(), PostprocessConfig(median_size=args.median), params)
    meta["inputs"] = modalities
    meta["training_data"] = {"manifest": f"none (no training; calibrated on {N_SCANS} synthetic template sessions)"}
    save_model(args.output, meta)

    def sessions():
        for seed in range(N_SCANS):
            images = {}
            for m in modalities:
                images[m], mask = healthy_template_scan(m, seed, grid)
            yield f"synthetic-session-{seed}", images, mask

    meta["calibration"] = calibrate_volumes(load_model(args.output), sessions(), Reporter())
    meta["calibration"]["method"] += ("; synthetic healthy sessions from the template tissue maps "
                                      "(scripts/make_fusion_model.py)")
    save_model(args.output, meta)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
