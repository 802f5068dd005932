"""`brainanomaly view`: the browser viewer (BrainAnomalyViewer), served on this computer only by default. trame and
the viewer are imported when the command runs, never when the parser is built."""

from __future__ import annotations

import errno
import importlib
import socket
import sys
from pathlib import Path

from ..core.errors import BadInputError, BrainAnomalyError
from ..core.progress import CancelToken

# The viewer sits beside BrainAnomalyLib in a source checkout (it is not part of the installed library).
_SOURCE_ROOT = Path(__file__).resolve().parents[2]


def add_parser(sub) -> None:
    p = sub.add_parser("view", help="open the browser viewer: slice and 3D views, detect, threshold, lesion table")
    p.add_argument("input", nargs="?", help="volume file or DICOM series folder to load at start (optional)")
    p.add_argument("--model", help="model selected at start (default: the shipped default model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this computer only; the page can read and write "
                        "files wherever this user can, so think twice before serving it to a network)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.add_argument("--open", action="store_true", help="open the page in the default web browser")


def check_port(host: str, port: int) -> None:
    """Fail in one line, before anything is built, when the port cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise BadInputError(f"port {port} on {host} is taken (another viewer or server?); pass --port with "
                                    "a free one") from None
            raise BadInputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _viewer_app():
    if not (_SOURCE_ROOT / "BrainAnomalyViewer" / "__init__.py").is_file():
        raise BrainAnomalyError("the browser viewer runs from a source checkout of BrainAnomaly (BrainAnomalyViewer/ "
                                "beside BrainAnomalyLib/); it is not part of the installed library")
    if str(_SOURCE_ROOT) not in sys.path:
        sys.path.insert(0, str(_SOURCE_ROOT))
    try:
        return importlib.import_module("BrainAnomalyViewer.app")
    except ImportError as exc:
        raise BrainAnomalyError(f"the browser viewer needs packages that are not installed ({exc}); install "
                                "requirements.txt") from None


def run(args, cancel: CancelToken) -> int:
    check_port(args.host, args.port)
    _viewer_app().serve(host=args.host, port=args.port, input_path=args.input, model=args.model,
                        open_browser=args.open)
    return 0
