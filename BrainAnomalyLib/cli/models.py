"""`brainanomaly models`: list, import, fetch and verify models."""

from __future__ import annotations

from ..core.errors import ModelError
from ..core.progress import CancelToken, Reporter
from .progress_bar import ProgressBar


def add_parser(sub) -> None:
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


def run(args, cancel: CancelToken) -> int:
    from ..store import model_store
    from ..store.models import default_model_name, list_models

    action = getattr(args, "models_command", None)
    if action == "import":
        folder = model_store.import_model(args.source, overwrite=args.overwrite, reporter=Reporter(None, cancel))
        print(f"model {folder.name} installed in {folder}")
        return 0
    if action == "fetch":
        bar = ProgressBar(args.quiet, "fetch model")
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
        inputs = r.get("inputs") or []
        # a model of several contrasts shows them all (T1+T2+FLAIR), as its results name them
        modality = "+".join(inputs) if len(inputs) > 1 else r.get("modality") or "?"
        print(f"{mark} {r['id']:<22} {r.get('kind') or '?':<10} {modality:<6} {r['source']:<8} "
              f"{r.get('description', '')}")
    print("* default model")
    return 0

