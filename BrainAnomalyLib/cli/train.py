"""`brainanomaly train`: fit a model on healthy scans."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..core.errors import BadInputError
from ..core.progress import CancelToken, Reporter
from ..detection.request import PreprocessOptions, add_preprocess_options
from .progress_bar import ProgressBar


def _score_arg(text: str) -> str:
    from ..scorers.learned import score_parts

    try:
        return "+".join(score_parts(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model on healthy scans from a manifest")
    p.add_argument("--model", required=True, dest="kind",
                   help="scorer kind: normative, intensity, tissue (non-deep); ae_dense, ae_spatial, vae, cae, "
                        "anovaegan, dae, dpa (learned, on axial slices); ddpm, pddpm, cddpm, ldm (diffusion, on axial "
                        "slices)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="CSV of healthy scans (rows with a mask are skipped)")
    source.add_argument("--pack", help="a training pack (scripts/pack_training_cache.py) instead of a manifest: "
                                       "learned scorers only; its scans, split and preprocessing are fixed in it, "
                                       "and the model is written uncalibrated (then `brainanomaly calibrate "
                                       "--split calibration` on the manifest it was packed from)")
    p.add_argument("--half", action="store_true", help="with --pack: store the weights as float16")
    p.add_argument("--modality", default="T1", help="which manifest rows to train on (with --pack: the pack's)")
    p.add_argument("--direction", default="auto", choices=["auto", "hyper", "hypo", "two-sided"],
                   help="which deviations count as anomalous (auto: by modality)")
    p.add_argument("--name", help="model name (default: the output folder's name)")
    p.add_argument("--cache-dir", help="where preprocessed volumes are cached (default ~/.cache/brainanomaly)")
    p.add_argument("--max-train", type=int, help="use at most this many training scans")
    p.add_argument("--normalisation", default="median-iqr",
                   choices=["median-iqr", "percentile", "tissue-peaks", "histogram"],
                   help="intensity standardisation, stored with the model and applied by detect "
                        "(histogram: Nyul landmarks learned from the training scans)")
    add_preprocess_options(p)
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
    p.add_argument("--allow-few-scans", action="store_true",
                   help="calibrate on fewer than 5 healthy scans (15 %% of the healthy subjects are held out for "
                        "calibration, so fewer than 31 subjects give fewer than 5; refused without it); the "
                        "model's calibration record then says so (few_scans in model.json)")
    p.add_argument("-o", "--output", required=True, help="model folder to write")
    p.add_argument("-q", "--quiet", action="store_true")


def run(args, cancel: CancelToken) -> int:
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
    bar = ProgressBar(args.quiet, "train")
    if args.pack:
        return _run_pack(args, options, bar, cancel)
    from ..training.run import train

    try:
        folder = train(args.kind, Path(args.manifest), args.modality.upper(), Path(args.output),
                       Reporter(bar, cancel), name=args.name, direction=args.direction,
                       cache_dir=Path(args.cache_dir) if args.cache_dir else None, max_train=args.max_train,
                       pre=PreprocessOptions.from_args(args).apply({"normalisation": args.normalisation}),
                       options=options, allow_few_scans=args.allow_few_scans)
    except (KeyError, ValueError) as exc:
        raise BadInputError(str(exc).strip("'")) from None
    finally:
        bar.close()
    if folder is None:  # a torchrun worker other than rank 0: rank 0 writes the model
        return 0
    meta = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    print(f"model written to {folder}; calibrated thresholds {meta['calibration']['thresholds']}")
    other = meta["training_data"].get("other_modality_rows")
    if other:
        print(f"skipped {other} manifest row(s) of other modalities: this model is for {meta['modality']}")
    if meta["calibration"].get("few_scans"):
        print(f"note: {meta['calibration']['few_scans']['note']}")
    return 0



def _run_pack(args, options: dict, bar, cancel: CancelToken) -> int:
    from ..training.packed import train_from_pack

    try:
        folder = train_from_pack(args.kind, Path(args.pack), Path(args.output), Reporter(bar, cancel),
                                 name=args.name, direction=args.direction, options=options, half=args.half)
    except (KeyError, ValueError) as exc:
        raise BadInputError(str(exc).strip("'")) from None
    finally:
        bar.close()
    if folder is not None:
        print(f"model written to {folder} (uncalibrated: calibrate it on the held-out scans of the manifest it was "
              "packed from, brainanomaly calibrate --split calibration)")
    return 0
