"""`brainanomaly evaluate`: metrics of models on a manifest, through the detection path."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List

from ..core.errors import BadInputError
from ..core.progress import CancelToken, Reporter
from ..detection.request import add_calibration_option
from .progress_bar import ProgressBar


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics of one or more models on a manifest, through the detect path")
    p.add_argument("--manifest", required=True, help="CSV of scans; rows with a mask are lesion scans")
    p.add_argument("--model", action="append", help="model id or folder; repeat to compare models "
                                                     "(default: the shipped default model)")
    p.add_argument("--healthy", help="CSV of healthy scans: scan-level AUROC and healthy false-positive rate")
    p.add_argument("--modality", help="evaluate rows of this modality (default: the models' modality)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--threshold", type=float, help="raw score threshold instead of the calibrated one")
    g.add_argument("--false-findings", type=float, help="lesion-level operating point: false findings per healthy "
                                                         "scan (default 0.5 for models calibrated for it)")
    g.add_argument("--fpr", type=float, help="calibrated healthy voxel FPR to threshold at instead (the default for "
                                             "models without a lesion-level calibration: 0.01)")
    p.add_argument("--device", default="auto")
    add_calibration_option(p)
    p.add_argument("--no-cache", action="store_true", help="preprocess every scan again instead of reusing the "
                   "preprocessing cache (~/.cache/brainanomaly/preprocessed, or $BRAINANOMALY_CACHE)")
    p.add_argument("--workers", type=int, help="worker processes, each scoring whole cases with every model "
                   "(default: one per core, as many as the free memory holds; 1: this process); same numbers")
    p.add_argument("-o", "--output", required=True, help="report folder")
    p.add_argument("-q", "--quiet", action="store_true")


def run(args, cancel: CancelToken) -> int:
    from ..evaluation.evaluate import evaluate
    from ..evaluation.report import markdown_table, write_report
    from ..core.manifest import normalise_modality, read_manifest, skipped_rows
    from ..store.models import resolve_model
    from ..detection.pipeline import Detector
    from ..core.workers import default_workers

    if args.workers is not None and args.workers < 1:
        raise BadInputError("--workers must be at least 1")
    detectors, thresholds = {}, {}
    for name in args.model or [None]:
        model = resolve_model(name)
        if model.name in detectors:
            # Results are keyed by model name: a second folder of the same name would silently replace the first.
            raise BadInputError(f"two of the models are named {model.name!r}; give one another name (the 'name' in "
                                "its model.json, or train it with --name) to compare them")
        detectors[model.name] = Detector.for_model(model, device=args.device, calibration=args.calibration)
        thresholds[model.name] = detectors[model.name].threshold(args.threshold, args.fpr, args.false_findings)
    modalities = {d.model.modality for d in detectors.values()}
    if len(modalities) > 1:
        raise BadInputError(f"models of different modalities ({', '.join(sorted(modalities))}) cannot be "
                            "evaluated on the same scans")
    model_modality = modalities.pop()
    modality = args.modality or model_modality
    fusions = [d for d in detectors.values() if d.model.kind == "fusion"]
    if fusions and normalise_modality(modality) != model_modality:
        raise BadInputError(f"a fusion model is evaluated on the rows of its reference contrast, {model_modality}")
    for det in detectors.values():
        if det not in fusions:
            det.check_modality(modality)
    why = f"--modality {args.modality} was asked for" if args.modality else f"the models are for {modality}"
    cases = []
    for i, manifest in enumerate([args.manifest] + ([args.healthy] if args.healthy else [])):
        other = []
        rows = read_manifest(manifest, modality, other)
        if other and not fusions:  # a fusion model's other contrasts come in as the subjects' companions
            print(f"{Path(manifest).name}: {skipped_rows(other, len(rows) + len(other), why)}", file=sys.stderr)
        cases += rows if i == 0 else [c for c in rows if c.mask is None]  # --healthy: its healthy rows
    companions = None
    if fusions:
        # each lesion case's other contrasts: the manifest's rows of the same subject
        companions = {}
        for c in read_manifest(args.manifest) + (read_manifest(args.healthy) if args.healthy else []):
            companions.setdefault(c.subject, {})[c.modality] = c.image
    bar = ProgressBar(args.quiet, "evaluate")
    skipped: List[str] = []
    try:
        results = evaluate(cases, detectors, Reporter(bar, cancel), skipped, thresholds, companions,
                           cache=not args.no_cache, workers=args.workers or default_workers(len(cases)))
    except ValueError as exc:
        raise BadInputError(str(exc)) from None
    finally:
        bar.close()
    for line in skipped:
        print(f"skipped: {line}", file=sys.stderr)
    if len(skipped) == len(cases):
        raise BadInputError("no case could be evaluated")
    out = write_report(results, Path(args.output), f"{Path(args.manifest).name} ({modality})")
    print(markdown_table(results))
    print(f"report in {out}: metrics.json, metrics.md, pr_curves.png, <model>_best.png, <model>_worst.png")
    return 0

