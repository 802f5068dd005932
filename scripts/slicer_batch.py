"""Batch anomaly detection through the BrainAnomaly module's logic.

    Slicer --no-main-window --python-script scripts/slicer_batch.py --manifest CSV --model NAME -o OUTDIR

Also runs with a plain Python that has the slicer-core wheel (same logic, same outputs). Each case gets
OUTDIR/<subject>/ with the files `brainanomaly detect --format nrrd` writes (anomaly_map.nrrd, pred_mask.nrrd,
brain_mask.nrrd, reconstruction.nrrd, lesions.csv, result.json, overlay.png); OUTDIR/summary.csv lists every case.
OUTDIR must be new or empty, or hold only an earlier batch run and --overwrite be given (it is then replaced whole at
the end). Exits 0 when every case succeeded, 1 when any failed, 2 on bad arguments or such an OUTDIR.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for folder in (ROOT, ROOT / "BrainAnomaly"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


def parse(argv):
    p = argparse.ArgumentParser(prog="slicer_batch.py", description=__doc__.split("\n")[0])
    p.add_argument("--manifest", required=True, help="CSV with subject,modality,image,mask")
    p.add_argument("--model", help="model id or folder (default: the shipped default)")
    p.add_argument("--modality", help="rows of this modality (default: the model's)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--false-findings", type=float,
                   help="false findings per healthy scan (0.05-10; default 0.5 for models calibrated for findings)")
    g.add_argument("--fpr", type=float, help="instead: every finding above this healthy voxel false-positive rate "
                                             "(default 0.01 for models not calibrated for findings)")
    p.add_argument("--min-lesion-ml", type=float, default=0.05)
    p.add_argument("--skull-strip", default="auto", choices=["auto", "deepbet", "none"])
    p.add_argument("--no-bias-correction", action="store_true")
    p.add_argument("--no-register", action="store_true")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier batch run in OUTDIR, all of it at the end (without it such a folder is "
                        "refused; a folder holding other files is refused even with it)")
    return p.parse_args(argv)


def _install_dependencies(slicer, log) -> None:
    """Inside the Slicer application, install what inference needs (a fresh Slicer lacks torch and the rest), without
    asking: the command line is the user's consent. Elsewhere (slicer-core wheel) the environment is the caller's."""
    if not hasattr(slicer, "app"):
        return
    from BrainAnomalySlicer.dependencies import ensure_dependencies, slicer_installers

    ensure_dependencies(log, None, *slicer_installers())


def main(argv=None) -> int:
    import slicer

    from BrainAnomalySlicer.batch import run_batch
    from BrainAnomalySlicer.logic import DetectionError, DetectionOptions

    try:
        args = parse(argv)
    except SystemExit as exc:
        return 2 if exc.code else 0
    options = DetectionOptions(model=args.model, device=args.device, fpr=args.fpr, false_findings=args.false_findings,
                               min_lesion_ml=args.min_lesion_ml,
                               skull_strip=args.skull_strip,
                               bias_correction=not args.no_bias_correction, registration=not args.no_register)
    scene = slicer.mrmlScene if hasattr(slicer, "mrmlScene") else slicer.vtkMRMLScene()
    try:
        _install_dependencies(slicer, lambda message: print(message, file=sys.stderr))
        rows = run_batch(args.manifest, args.output, options, scene, modality=args.modality,
                         overwrite=args.overwrite)
    except Exception as exc:  # a message, not a traceback, for every failure before the first case
        print(f"slicer_batch: {exc}", file=sys.stderr)
        if isinstance(exc, DetectionError) and exc.kind == "BadInputError":
            return 2
        return getattr(exc, "exit_code", None) or 1
    failed = [r for r in rows if r["status"] == "failed"]
    ran = [r for r in rows if r["status"] != "skipped"]  # skipped rows (other modalities) were named already
    print(f"{len(ran) - len(failed)} of {len(ran)} cases done; summary in {Path(args.output) / 'summary.csv'}")
    for r in failed:
        print(f"  failed: {r['subject']}: {r['message']}", file=sys.stderr)
    return 1 if failed or not any(r["status"] == "ok" for r in rows) else 0


def run(argv) -> int:
    """main() with the exit Slicer needs: started with --no-main-window, the application would otherwise stay
    running, window-less, after the script, so it is told to quit whatever happened (an uncaught error exits 1)."""
    code = 1
    try:
        code = main(argv)
    except BaseException:
        import traceback

        traceback.print_exc()
        raise
    finally:
        try:
            import slicer
        except ImportError:
            slicer = None
        if slicer is not None and hasattr(slicer, "app"):  # inside Slicer: quit the application with the code
            slicer.util.exit(code)
    return code


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
