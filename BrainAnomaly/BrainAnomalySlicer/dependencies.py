"""Install, on first use inside 3D Slicer, the Python packages that inference needs and Slicer does not ship.

Slicer's Python carries its own numpy and SimpleITK, built with the application; replacing them breaks Slicer, so
every pip call here is constrained to the versions already installed. torch is not pip-installed here at all: the
PyTorch extension's installer picks the build that matches the machine's GPU driver (or the CPU build), which a
plain `pip install torch` would get wrong.

The module imports neither slicer nor the packages it checks for, and the installers are passed in, so the logic
runs under plain pytest; `slicer_installers()` gives the real ones inside Slicer.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import re
import tempfile
from typing import Callable, List, Optional, Sequence, Tuple

# Ranges, not pins: Slicer's Python (3.10-3.12 across releases) and its numpy differ from the project's pinned
# venv, so pip must be free to choose versions that fit them. These are the ranges pyproject.toml declares for
# users; the versions pinned in requirements.txt satisfy them (both checked by Testing/test_dependencies.py).
TORCH_REQUIREMENT = "torch>=2.1"
REQUIREMENTS: Tuple[str, ...] = (
    "scipy>=1.10",
    "monai>=1.3",
    "einops>=0.7",
    "nilearn>=0.10",  # the MNI template and tissue maps ship inside nilearn
    "nibabel>=5.0",  # reads NIfTI voxels as stored (ITK turns NaN into 0)
    "deepbet>=1.0.2",  # skull stripping; its weights ship inside the package
    "safetensors>=0.4",  # model tensors
    "tqdm>=4.60",
    "matplotlib>=3.7",  # the PR curves and training reports of evaluate and train (overlay.png needs only Pillow)
    "pillow>=10.1",  # overlay.png is drawn with it (load_default(size=...)); training reports store palette PNGs
    "pydicom>=3.0",  # reads the source series of a DICOM export
    "highdicom>=0.28",  # writes the DICOM SEG and Parametric Map of 'Export to DICOM'
)
# Slicer's own builds: pinned to what is installed so that no dependency can make pip replace them.
PROTECTED = ("numpy", "SimpleITK")

_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:>=\s*([0-9][0-9.]*))?\s*$")


class DependencyError(RuntimeError):
    """Packages could not be installed; the message says what the user can do."""


def _parse(requirement: str) -> Tuple[str, Optional[Tuple[int, ...]]]:
    # Only 'name' and 'name>=X.Y' are needed here; anything else is a programming error, caught by the tests.
    m = _REQ.match(requirement)
    if not m:
        raise ValueError(f"unsupported requirement {requirement!r} (use 'name' or 'name>=X.Y')")
    return m.group(1), (_release(m.group(2)) if m.group(2) else None)


def _release(version: str) -> Tuple[int, ...]:
    """The numeric release part of a version ('2.5.1+cu121' -> (2, 5, 1)); local and pre-release tags ignored."""
    parts = []
    for piece in version.split("."):
        digits = re.match(r"\d+", piece)
        if not digits:
            break
        parts.append(int(digits.group()))
        if digits.group() != piece:
            break
    return tuple(parts)


def _at_least(version: str, minimum: Tuple[int, ...]) -> bool:
    have = _release(version)
    n = max(len(have), len(minimum))
    return have + (0,) * (n - len(have)) >= minimum + (0,) * (n - len(minimum))


def installed_version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# Distributions whose import name is not their name.
_IMPORT_NAMES = {"pillow": "PIL"}


def _import_name(distribution: str) -> str:
    name = distribution.lower().replace("-", "_")
    return _IMPORT_NAMES.get(name, name)


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def missing(requirements: Sequence[str] = REQUIREMENTS) -> List[str]:
    """The requirements not satisfied now: not installed, too old, or installed but not importable.

    Uses package metadata and import specs only, so checking never imports (or half-imports) torch or monai.
    """
    importlib.invalidate_caches()  # packages installed a moment ago in this process must be seen
    out = []
    for req in requirements:
        name, minimum = _parse(req)
        version = installed_version(name)
        if version is None or not _importable(_import_name(name)):
            out.append(req)
        elif minimum is not None and not _at_least(version, minimum):
            out.append(req)
    return out


def constraints(packages: Sequence[str] = PROTECTED + ("torch",)) -> List[str]:
    """'name==version' for each of `packages` that is installed: what pip must leave exactly as it is.

    torch is included once present, so that a dependency asking for torch cannot swap the CUDA build the PyTorch
    extension chose for a generic one from PyPI.
    """
    return [f"{name}=={v}" for name in packages if (v := installed_version(name)) is not None]


def _confirm_message(need_torch: bool, rest: Sequence[str]) -> str:
    names = (["PyTorch (through the PyTorch extension)"] if need_torch else []) + list(rest)
    return ("BrainAnomaly needs these Python packages, which are not installed yet:\n  " + "\n  ".join(names)
            + "\n\nThey are downloaded from the internet (PyTorch can be a few GB) and installed into Slicer's "
            "Python; Slicer's own numpy and SimpleITK are left as they are. This may take several minutes. "
            "Install now?")


def ensure_dependencies(progress: Optional[Callable[[str], None]] = None,
                        confirm: Optional[Callable[[str], bool]] = None,
                        torch_installer: Optional[Callable[[], object]] = None,
                        pip_installer: Optional[Callable[[List[str], List[str]], object]] = None) -> bool:
    """Make sure inference can import what it needs; install what is missing.

    Returns True when everything is available (at once, calling nothing, if it already was) and False when the
    user declined: `confirm(message)` returned False, or `torch_installer()` returned False because the user
    declined in its own dialog. Nothing is installed after a decline. `confirm=None` installs without asking
    (for scripts). `pip_installer(requirements, constraints)` gets requirement strings and 'name==version'
    constraints it must honour. Raises DependencyError when an installer is needed but not given, or when
    packages are still missing after installing.
    """
    say = progress or (lambda message: None)
    need_torch = bool(missing([TORCH_REQUIREMENT]))
    rest = missing(REQUIREMENTS)
    if not need_torch and not rest:
        return True
    if confirm is not None and not confirm(_confirm_message(need_torch, rest)):
        say("Installation of Python packages declined")
        return False
    if need_torch:
        if torch_installer is None:
            raise DependencyError("PyTorch is missing and no way to install it was given")
        say("Installing PyTorch (this can take several minutes)...")
        if torch_installer() is False:
            say("Installation of PyTorch declined")
            return False
        if missing([TORCH_REQUIREMENT]):
            raise DependencyError(f"PyTorch ({TORCH_REQUIREMENT}) is still not available after installing it; "
                                  "see the PyTorch extension's messages in the Python console")
    rest = missing(REQUIREMENTS)  # the torch installer may have brought some of them
    if rest:
        if pip_installer is None:
            raise DependencyError(f"missing Python packages ({', '.join(rest)}) and no way to install them was "
                                  "given")
        say(f"Installing {', '.join(_parse(r)[0] for r in rest)}...")
        pip_installer(list(rest), constraints())  # constraints taken now, so they pin the torch just installed
    still = missing([TORCH_REQUIREMENT, *REQUIREMENTS])
    if still:
        raise DependencyError(f"still missing after installation: {', '.join(still)}. Check the Python console "
                              "for pip's messages; an internet connection is needed the first time")
    say("Python packages ready")
    return True


# ----------------------------------------------------------------------------------------------------------------
# inside Slicer


def _call_with_supported(fn, *args, **kwargs):
    """Call `fn` with only the keyword arguments its signature has: Slicer's pip helpers gained options over
    releases, and an unknown keyword would be a TypeError on an older Slicer."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(*args)
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return fn(*args, **kwargs)


def _find_pip_ensure():
    """`pip_ensure` where this Slicer has it (slicer.pydeps since Slicer 5.11; slicer.packaging in some
    previews), else None."""
    for module in ("slicer.pydeps", "slicer.packaging"):
        try:
            fn = getattr(importlib.import_module(module), "pip_ensure", None)
        except ImportError:
            continue
        if callable(fn):
            return fn
    return None


def slicer_installers(requester: str = "BrainAnomaly"):
    """(torch_installer, pip_installer) for use inside Slicer; imports slicer, so call it only there."""
    import slicer  # only available inside the application

    def torch_installer() -> bool:
        try:
            import PyTorchUtils
        except ImportError:
            raise DependencyError(
                'BrainAnomaly needs PyTorch, which Slicer installs through the "PyTorch" extension: open '
                'View > Extensions Manager, install "PyTorch", restart Slicer, then try again.') from None
        # The extension picks the torch build for this machine's GPU driver (or the CPU build) and asks the user.
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT[len("torch"):])
        return torch is not None

    def pip_installer(requirements: List[str], pinned: List[str]) -> None:
        fd, path = tempfile.mkstemp(prefix="brainanomaly-constraints-", suffix=".txt")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write("\n".join(pinned) + "\n")
            pip_ensure = _find_pip_ensure()
            if pip_ensure is not None:
                from packaging.requirements import Requirement

                # We asked the user already; Slicer's own prompt would ask a second time. Slicer >= 5.12 skips
                # installs under --testing by default, which would fail the self-test: it needs them.
                _call_with_supported(pip_ensure, [Requirement(r) for r in requirements], constraints=path,
                                     prompt_install=False, requester=requester, skip_in_testing=False)
            else:
                # Older Slicer: pip_install takes pip's own arguments, as a list so a path with spaces survives.
                slicer.util.pip_install([*requirements, "-c", path])
        finally:
            os.unlink(path)

    return torch_installer, pip_installer
