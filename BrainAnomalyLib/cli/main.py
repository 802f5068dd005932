"""The `brainanomaly` command: detect, demo, train, calibrate, evaluate, synth, models."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import List, Optional

from .. import __version__
from ..core.errors import BadInputError, BrainAnomalyError, Cancelled, ModelError
from ..core.progress import CancelToken, Reporter


class _Bar:
    """Progress for a terminal (a tqdm bar) or for a log (one line per step); silent with --quiet."""

    def __init__(self, quiet: bool, total_label: str = ""):
        self.bar = None
        self.quiet = quiet
        self.last_step = None
        self.last_n = -1
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=1000, desc=total_label, bar_format="{desc:<38}{bar}| {percentage:3.0f}% "
                            "[{elapsed}<{remaining}]", file=sys.stderr, leave=False, mininterval=0.2)

    def __call__(self, step: str, fraction: float) -> None:
        if self.quiet:
            return
        n = int(1000 * fraction)
        if self.bar is None:
            if step != self.last_step:
                print(f"[{fraction:4.0%}] {step}", file=sys.stderr, flush=True)
        elif step != self.last_step or n - self.last_n >= 5:
            self.bar.set_description_str(step[:38], refresh=False)
            self.bar.update(n - self.bar.n)
        self.last_step, self.last_n = step, n

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _add_calibration_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", default="adaptive", choices=["adaptive", "cohort"],
                   help="adaptive (default): the healthy-cohort threshold moved to the scan's own score "
                        "distribution, so its false-positive rate holds on other scanners; cohort: as calibrated")


def _add_preprocess_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skull-strip", default=None, choices=["auto", "deepbet", "none"],
                   help="auto (default) strips unless the scan is already skull-stripped")
    p.add_argument("--no-bias-correction", action="store_true", help="skip N4 bias correction")
    p.add_argument("--no-register", action="store_true", help="the scan is already in the template space")


def _preprocess_config(args, base: dict):
    from ..preprocess.chain import PreprocessConfig

    pre = PreprocessConfig.from_dict(base)
    if getattr(args, "skull_strip", None):
        pre.skull_strip = args.skull_strip
    if getattr(args, "no_bias_correction", False):
        pre.bias_correction = False
    if getattr(args, "no_register", False):
        pre.registration = "none"
    return pre


def _add_detect_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model id (see 'brainanomaly models') or model folder; default: the shipped "
                                   "default model")
    p.add_argument("--modality", help="T1, T1CE, T2, FLAIR, ... (default: the model's modality; giving it also "
                                      "overrides the check of the scan's recognised contrast)")
    p.add_argument("--fill-nan", action="store_true", help="set NaN/infinite voxels to the lowest value instead "
                                                           "of refusing the scan")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--threshold", type=float, help="raw anomaly-score threshold")
    g.add_argument("--fpr", type=float, help="calibrated healthy voxel false-positive rate, e.g. 0.01 (default)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    _add_calibration_option(p)
    _add_preprocess_options(p)
    p.add_argument("--erode", type=int, default=None, help="brain-mask erosion in grid voxels (default 3)")
    p.add_argument("--median", type=int, default=None, help="in-plane median filter size (default 5; 1 = off)")
    p.add_argument("--min-lesion-ml", type=float, default=None, help="smallest reported lesion (default 0.05 mL)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _score_arg(text: str) -> str:
    from ..scorers.learned import score_parts

    try:
        return "+".join(score_parts(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brainanomaly", description="Unsupervised anomaly detection in brain MRI.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("detect", help="detect anomalies in a scan or a manifest of scans")
    p.add_argument("input", nargs="?", help="volume file (NIfTI, NRRD, MHA, ...) or DICOM series folder")
    p.add_argument("--manifest", help="CSV with subject,modality,image,mask: run every row")
    _add_detect_options(p)

    p = sub.add_parser("demo", help="build a synthetic case from the bundled template and detect its lesion")
    p.add_argument("-o", "--output", default="demo_output", help="output folder (default demo_output)")
    p.add_argument("--model", help="model to use (default: the shipped default model)")
    p.add_argument("--device", default="cpu", help="cpu (default) | auto | cuda")
    p.add_argument("-q", "--quiet", action="store_true")

    p = sub.add_parser("train", help="train a model on healthy scans from a manifest")
    p.add_argument("--model", required=True, dest="kind",
                   help="scorer kind: normative, intensity (non-deep); ae_dense, ae_spatial, vae, cae, anovaegan, "
                        "dae, dpa (learned, on axial slices); ddpm, pddpm, cddpm, ldm (diffusion, on axial slices)")
    p.add_argument("--manifest", required=True, help="CSV of healthy scans (rows with a mask are skipped)")
    p.add_argument("--modality", default="T1")
    p.add_argument("--direction", default="auto", choices=["auto", "hyper", "hypo", "two-sided"],
                   help="which deviations count as anomalous (auto: by modality)")
    p.add_argument("--name", help="model name (default: the output folder's name)")
    p.add_argument("--cache-dir", help="where preprocessed volumes are cached (default ~/.cache/brainanomaly)")
    p.add_argument("--max-train", type=int, help="use at most this many training scans")
    p.add_argument("--normalisation", default="median-iqr",
                   choices=["median-iqr", "percentile", "tissue-peaks", "histogram"],
                   help="intensity standardisation, stored with the model and applied by detect "
                        "(histogram: Nyul landmarks learned from the training scans)")
    _add_preprocess_options(p)
    g = p.add_argument_group("learned scorers")
    g.add_argument("--epochs", type=int, help="most epochs (early stopping on validation loss may stop sooner)")
    g.add_argument("--batch-size", type=int, help="slices per batch")
    g.add_argument("--lr", type=float, help="learning rate")
    g.add_argument("--patience", type=int, help="epochs without validation improvement before stopping")
    g.add_argument("--max-minutes", type=float, help="time budget; stops cleanly with the best weights so far")
    g.add_argument("--steps-per-epoch", type=int, help="cap on training steps per epoch")
    g.add_argument("--seed", type=int, help="random seed (default 0)")
    g.add_argument("--device", default=None, help="auto | cpu | cuda (default auto)")
    g.add_argument("--context", type=int, default=None, help="neighbouring slices on each side as extra channels "
                                                              "(2.5D; default 0)")
    g.add_argument("--score", type=_score_arg, metavar="SCORE",
                   help="anomaly score of the model: signed, l1, ssim or perceptual, or several joined by '+' "
                        "(e.g. perceptual+signed: the standardised maps are averaged)")
    g.add_argument("--residual-norm", choices=["voxel", "none"], default="voxel",
                   help="voxel (default): score each voxel's map against the spread of the trained network's maps "
                        "on the healthy training scans at that voxel; none: the raw map")
    g.add_argument("--scan-norm", choices=["robust", "none"], default="robust",
                   help="robust (default): then divide each scan's map by its own median and MAD in the brain, so "
                        "scans from other scanners share one scale")
    g.add_argument("--arch", help="JSON object overriding the network's default hyperparameters")
    g.add_argument("--no-augment", action="store_true", help="no intensity/affine/bias-field augmentation")
    g.add_argument("--resume", action="store_true", help="continue from OUTPUT.checkpoints if present")
    g.add_argument("--realism-samples", type=int, default=None, metavar="N",
                   help="ddpm, ldm: slices to draw from the trained model for the realism check in the training "
                        "report (training/realism.json, samples.png; default 256, 0 skips it)")
    g.add_argument("--realism-encoder", default=None, metavar="MODEL",
                   help="model whose trained feature net judges realism (default dpa-t1-ixi, for T1)")
    p.add_argument("-o", "--output", required=True, help="model folder to write")
    p.add_argument("-q", "--quiet", action="store_true")

    p = sub.add_parser("evaluate", help="metrics of one or more models on a manifest, through the detect path")
    p.add_argument("--manifest", required=True, help="CSV of scans; rows with a mask are lesion scans")
    p.add_argument("--model", action="append", help="model id or folder; repeat to compare models "
                                                     "(default: the shipped default model)")
    p.add_argument("--healthy", help="CSV of healthy scans: scan-level AUROC and healthy false-positive rate")
    p.add_argument("--modality", help="evaluate rows of this modality (default: the models' modality)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--threshold", type=float, help="raw score threshold instead of the calibrated one")
    g.add_argument("--fpr", type=float, help="calibrated healthy FPR to threshold at (default 0.01)")
    p.add_argument("--device", default="auto")
    _add_calibration_option(p)
    p.add_argument("-o", "--output", required=True, help="report folder")
    p.add_argument("-q", "--quiet", action="store_true")

    p = sub.add_parser("models", help="list the available models (or import, fetch, verify them)")
    msub = p.add_subparsers(dest="models_command")
    msub.add_parser("list", help="list the available models (the default)")
    m = msub.add_parser("import", help="install a model folder or a .zip of one into the user models folder")
    m.add_argument("source", help="model folder or .zip")
    m.add_argument("--overwrite", action="store_true", help="replace an installed model of the same name")
    m = msub.add_parser("fetch", help="download a model .zip, check its sha256, install it")
    m.add_argument("url", help="http(s) or file URL of the model .zip")
    m.add_argument("--sha256", required=True, help="the zip's sha256, as published with the model")
    m.add_argument("--overwrite", action="store_true", help="replace an installed model of the same name")
    m.add_argument("-q", "--quiet", action="store_true")
    msub.add_parser("verify", help="check the shipped models against their registry (exit 3 if not intact)")
    p = sub.add_parser("ensemble", help="combine calibrated models of one modality into one model (maps on a "
                                        "common healthy scale, averaged); calibrate the result like any model")
    p.add_argument("--model", action="append", required=True, help="member model id or folder; repeat")
    p.add_argument("--weight", action="append", type=float, help="member weight, in --model order (default equal)")
    p.add_argument("--name", help="model name (default: the output folder's name)")
    p.add_argument("-o", "--output", required=True, help="model folder to write")
    from . import synth as synth_cli

    synth_cli.add_parser(sub)
    from . import calibrate as calibrate_cli

    calibrate_cli.add_parser(sub)
    return parser


def _detector(args):
    from ..store.models import resolve_model
    from ..detection.pipeline import Detector
    from ..detection.postprocess import PostprocessConfig

    model = resolve_model(args.model)
    pre = _preprocess_config(args, model.meta.get("preprocessing", {}))
    post = PostprocessConfig(**model.meta.get("postprocess", {}))
    for opt, attr in (("erode", "erode_voxels"), ("median", "median_size"), ("min_lesion_ml", "min_lesion_ml")):
        if getattr(args, opt, None) is not None:
            setattr(post, attr, getattr(args, opt))
    return Detector(model, device=args.device, preprocess_config=pre, postprocess_config=post,
                    calibration=getattr(args, "calibration", "adaptive"))


def _detect_one(det, path, modality, args, outdir, reporter) -> dict:
    from ..core.io import read_volume
    from ..detection.writers import write_result

    scan = read_volume(path, fill_nan=getattr(args, "fill_nan", False))
    result = det.run(scan, modality=modality, threshold=args.threshold, fpr=args.fpr, reporter=reporter)
    write_result(result, scan, outdir, input_name=Path(path).name)
    return result.summary()


def cmd_detect(args, cancel: CancelToken) -> int:
    if bool(args.input) == bool(args.manifest):
        raise BadInputError("give either an input volume or --manifest CSV (not both)")
    det = _detector(args)
    out = Path(args.output)
    if args.input:
        bar = _Bar(args.quiet, "detect")
        try:
            s = _detect_one(det, args.input, args.modality, args, out, Reporter(bar, cancel))
        finally:
            bar.close()
        _print_summary(s, out)
        return 0
    from ..core.manifest import read_manifest

    # Rows of other contrasts are for other models: run only those this model was built for.
    cases = read_manifest(args.manifest, args.modality or det.model.modality)
    bar = _Bar(args.quiet, "cohort")
    rows, failures = [], []
    try:
        for i, case in enumerate(cases):
            rep = Reporter(bar, cancel).sub(i / len(cases), (i + 1) / len(cases))
            try:
                s = _detect_one(det, case.image, case.modality, args, out / case.key, rep)
                rows.append([case.subject, case.modality, "ok", s["n_lesions"], s["anomalous_volume_ml"],
                             s["pred_score"], ""])
            except (BadInputError, ModelError) as exc:
                failures.append(f"{case.key}: {exc}")
                rows.append([case.subject, case.modality, "failed", "", "", "", str(exc)])
    finally:
        bar.close()
        if rows:
            _write_summary(out / "summary.csv", rows)
    print(f"{len(cases) - len(failures)} of {len(cases)} scans done; outputs in {out}/<subject>_<modality>/, "
          f"overview in {out / 'summary.csv'}")
    for f in failures:
        print(f"failed: {f}", file=sys.stderr)
    return 2 if failures else 0


def _write_summary(path: Path, rows) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["subject", "modality", "status", "n_lesions", "anomalous_volume_ml", "pred_score", "message"])
        w.writerows(rows)


def _print_summary(s: dict, out: Path) -> None:
    t = s["threshold"]
    what = f"healthy FPR {t['fpr']:.2%}" if t.get("fpr") else t["source"]
    if "adaptive" in t:
        what += f", scan-adaptive from {t['cohort_value']:.4g}"
    print(f"model {s['model']['name']} ({s['modality']}); threshold {t['value']:.4g} ({what}); "
          f"{s['n_lesions']} lesion(s), {s['anomalous_volume_ml']:.2f} mL; scan score {s['pred_score']:.3f}")
    for note in s.get("notes", []):
        print(f"note: {note}")
    print(f"outputs in {out}")


def cmd_demo(args, cancel: CancelToken) -> int:
    from ..synth.demo import make_demo_case
    from ..core.io import write_volume

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    scan, truth = make_demo_case()
    write_volume(scan, out / "demo_t1.nii.gz")
    write_volume(truth, out / "demo_truth.nii.gz")
    args.threshold = args.fpr = None
    det = _detector(args)
    bar = _Bar(args.quiet, "demo")
    try:
        s = _detect_one(det, out / "demo_t1.nii.gz", "T1", args, out, Reporter(bar, cancel))
    finally:
        bar.close()

    _print_summary(s, out)
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


def cmd_train(args, cancel: CancelToken) -> int:
    from ..training.run import train

    options = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "patience": args.patience,
               "max_minutes": args.max_minutes, "steps_per_epoch": args.steps_per_epoch, "seed": args.seed,
               "device": args.device, "context": args.context, "score": args.score, "resume": args.resume,
               "residual_norm": args.residual_norm, "scan_norm": args.scan_norm,
               "augment": False if args.no_augment else None, "realism_samples": args.realism_samples,
               "realism_encoder": args.realism_encoder}
    if args.arch:
        try:
            options["arch"] = json.loads(args.arch)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"--arch is not a JSON object: {exc}") from None
    options = {k: v for k, v in options.items() if v is not None}
    bar = _Bar(args.quiet, "train")
    try:
        folder = train(args.kind, Path(args.manifest), args.modality.upper(), Path(args.output),
                       Reporter(bar, cancel), name=args.name, direction=args.direction,
                       cache_dir=Path(args.cache_dir) if args.cache_dir else None, max_train=args.max_train,
                       pre=_preprocess_config(args, {"normalisation": args.normalisation}), options=options)
    except (KeyError, ValueError) as exc:
        raise BadInputError(str(exc).strip("'")) from None
    finally:
        bar.close()
    if folder is None:  # a torchrun worker other than rank 0: rank 0 writes the model
        return 0
    meta = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    print(f"model written to {folder}; calibrated thresholds {meta['calibration']['thresholds']}")
    return 0


def cmd_models(args, cancel: CancelToken) -> int:
    from ..store import model_store
    from ..store.models import default_model_name, list_models

    action = getattr(args, "models_command", None)
    if action == "import":
        folder = model_store.import_model(args.source, overwrite=args.overwrite, reporter=Reporter(None, cancel))
        print(f"model {folder.name} installed in {folder}")
        return 0
    if action == "fetch":
        bar = _Bar(args.quiet, "fetch model")
        try:
            folder = model_store.fetch_model(args.url, args.sha256, overwrite=args.overwrite,
                                             reporter=Reporter(bar, cancel))
        finally:
            bar.close()
        print(f"model {folder.name} installed in {folder}")
        return 0
    if action == "verify":
        problems = model_store.verify_registry()
        if problems:
            raise ModelError("shipped models are not intact:\n  " + "\n  ".join(problems))
        print(f"shipped models intact: {len(model_store.shipped_entries())} in {model_store.shipped_registry_file()}")
        return 0
    default = default_model_name()
    rows = list_models()
    if not rows:
        print("no models found")
        return 0
    for r in rows:
        mark = "*" if r["id"] == default else " "
        print(f"{mark} {r['id']:<22} {r.get('kind') or '?':<10} {r.get('modality') or '?':<6} {r['source']:<8} "
              f"{r.get('description', '')}")
    print("* default model")
    return 0


def cmd_evaluate(args, cancel: CancelToken) -> int:
    from ..evaluation.evaluate import evaluate
    from ..evaluation.report import markdown_table, write_report
    from ..core.manifest import read_manifest
    from ..store.models import resolve_model
    from ..detection.pipeline import Detector

    detectors, thresholds = {}, {}
    for name in args.model or [None]:
        model = resolve_model(name)
        if model.name in detectors:
            # Results are keyed by model name: a second folder of the same name would silently replace the first.
            raise BadInputError(f"two of the models are named {model.name!r}; give one another name (the 'name' in "
                                "its model.json, or train it with --name) to compare them")
        detectors[model.name] = Detector(model, device=args.device, calibration=args.calibration)
        thresholds[model.name] = detectors[model.name].threshold(args.threshold, args.fpr)
    modalities = {d.model.modality for d in detectors.values()}
    if len(modalities) > 1:
        raise BadInputError(f"models of different modalities ({', '.join(sorted(modalities))}) cannot be "
                            "evaluated on the same scans")
    modality = args.modality or modalities.pop()
    for det in detectors.values():
        det.check_modality(modality)
    cases = read_manifest(args.manifest, modality)
    if args.healthy:
        cases += [c for c in read_manifest(args.healthy, modality) if c.mask is None]
    bar = _Bar(args.quiet, "evaluate")
    skipped: List[str] = []
    try:
        results = evaluate(cases, detectors, Reporter(bar, cancel), skipped, thresholds)
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


def cmd_ensemble(args, cancel: CancelToken) -> int:
    from ..store.models import resolve_model, save_model
    from ..scorers.ensemble import build_ensemble

    models = [resolve_model(m) for m in args.model]
    if args.weight and len(args.weight) != len(models):
        raise BadInputError(f"{len(args.weight)} --weight values for {len(models)} models")
    try:
        params, tensors = build_ensemble(models, args.weight or ())
    except ValueError as exc:
        raise BadInputError(str(exc)) from None
    first = models[0].meta
    name = args.name or Path(args.output).name
    meta = {k: first[k] for k in ("template", "grid", "preprocessing", "postprocess") if k in first}
    meta.update(name=name, kind="ensemble", version="1.0.0", modality=models[0].modality,
                description="ensemble of " + ", ".join(m.name for m in models), params=params,
                members=[m.name for m in models])
    folder = save_model(Path(args.output), meta, tensors)
    print(f"ensemble written to {folder}; calibrate it on healthy scans: brainanomaly calibrate --model {folder} "
          "--manifest HEALTHY.csv")
    return 0


def cmd_calibrate(args, cancel: CancelToken) -> int:
    from . import calibrate as calibrate_cli

    return calibrate_cli.run(args, cancel)


def cmd_synth(args, cancel: CancelToken) -> int:
    from . import synth as synth_cli

    return synth_cli.run(args, cancel)


COMMANDS = {"detect": cmd_detect, "demo": cmd_demo, "train": cmd_train, "models": cmd_models, "synth": cmd_synth,
            "evaluate": cmd_evaluate, "calibrate": cmd_calibrate, "ensemble": cmd_ensemble}


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cancel = CancelToken()

    def _on_sigint(signum, frame):
        if cancel.cancelled:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        cancel.cancel()

    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        return COMMANDS[args.command](args, cancel)
    except KeyboardInterrupt:
        print("brainanomaly: cancelled", file=sys.stderr)
        return Cancelled.exit_code
    except BrainAnomalyError as exc:
        print(f"brainanomaly: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
