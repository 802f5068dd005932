"""`brainanomaly ensemble`: combine calibrated models of one modality into one model."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import BadInputError
from ..core.progress import CancelToken


def add_parser(sub) -> None:
    p = sub.add_parser("ensemble", help="combine calibrated models of one modality into one model (maps on a "
                                        "common scale, then averaged or their root mean square); calibrate the "
                                        "result like any model")
    p.add_argument("--model", action="append", required=True,
                   help="member: an installed model's id (or its folder); repeat. The ensemble refers to its members "
                        "by id and sha256 rather than copying them")
    p.add_argument("--weight", action="append", type=float, help="member weight, in --model order (default equal)")
    p.add_argument("--rule", choices=("mean", "rms"), default="mean",
                   help="mean (default): maps on their healthy cohorts' scale, weighted mean; rms: maps on the scan's "
                        "own scale, weighted root mean square of their positive parts, so a lesion one member alone "
                        "sees keeps most of its score")
    p.add_argument("--power", type=float, default=2.0,
                   help="rms rule only: p of the weighted power mean of the members' positive parts (default 2, the "
                        "root mean square); a larger p leaves a voxel more to the member that scores it highest")
    p.add_argument("--knee", action="append", type=float,
                   help="rms rule only: member knee t in --model order (default 0): the member adds max(z - t, 0) of "
                        "its scan-scaled map z, so only where it is clearly anomalous")
    p.add_argument("--contralateral", type=float,
                   help="share of each member's mirror-image map (across the template midline) taken off it before "
                        "the maps meet, 0-1 (default: the first member's post-processing setting)")
    p.add_argument("--name", help="model name (default: the output folder's name)")
    p.add_argument("--version", default="1.0.0", help="model version to record (default 1.0.0)")
    p.add_argument("-o", "--output", required=True, help="model folder to write")


def run(args, cancel: CancelToken) -> int:
    from ..store.models import resolve_model, save_model
    from ..store.ensembles import build_ensemble

    models = [resolve_model(m) for m in args.model]
    if args.weight and len(args.weight) != len(models):
        raise BadInputError(f"{len(args.weight)} --weight values for {len(models)} models")
    if args.knee and len(args.knee) != len(models):
        raise BadInputError(f"{len(args.knee)} --knee values for {len(models)} models")
    try:
        contralateral = args.contralateral
        if contralateral is None:
            contralateral = float((models[0].meta.get("postprocess") or {}).get("contralateral") or 0.0)
        params = build_ensemble(models, args.weight or (), args.rule, contralateral, args.power,
                                args.knee or ())
    except ValueError as exc:
        raise BadInputError(str(exc)) from None
    first = models[0].meta
    name = args.name or Path(args.output).name
    meta = {k: first[k] for k in ("template", "grid", "preprocessing", "postprocess") if k in first}
    # The members' maps are mirrored one by one (params), never the fused map again.
    meta["postprocess"] = dict(meta.get("postprocess") or {}, contralateral=0.0)
    meta.update(name=name, kind="ensemble", version=args.version, modality=models[0].modality,
                description="ensemble of " + ", ".join(m["id"] for m in params["members"]), params=params)
    folder = save_model(Path(args.output), meta)
    print(f"ensemble written to {folder}; calibrate it on healthy scans: brainanomaly calibrate --model {folder} "
          "--manifest HEALTHY.csv")
    return 0

