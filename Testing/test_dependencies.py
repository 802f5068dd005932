"""Lazy installation of inference packages for Slicer, run without Slicer: a fake package set and recording
installers stand in for Slicer's Python, and fake slicer/PyTorchUtils modules for the application."""

import ast
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "BrainAnomaly"))  # where Slicer puts the scripted module's folder

from BrainAnomalySlicer import dependencies as deps  # noqa: E402

ALL = [deps.TORCH_REQUIREMENT, *deps.REQUIREMENTS]


def _name(req: str) -> str:
    return deps._parse(req)[0]


class FakePython:
    """Installed distributions of a pretend Slicer Python; the fake installers add to it as pip would."""

    def __init__(self, monkeypatch, installed: dict):
        self.installed = dict(installed)
        self.calls = []
        monkeypatch.setattr(deps, "installed_version", lambda name: self.installed.get(name))
        monkeypatch.setattr(deps, "_importable", lambda module: module in {deps._import_name(n)
                                                                          for n in self.installed})

    def torch_installer(self):
        self.calls.append(("torch",))
        self.installed["torch"] = "2.5.1+cu121"

    def pip_installer(self, requirements, constraints):
        self.calls.append(("pip", list(requirements), list(constraints)))
        for req in requirements:
            self.installed[_name(req)] = "99.0"


SLICER_BASE = {"numpy": "1.26.4", "SimpleITK": "2.4.0"}
EVERYTHING = {**SLICER_BASE, "torch": "2.4.0", **{_name(r): "99.0" for r in deps.REQUIREMENTS}}


def test_nothing_missing_calls_nothing(monkeypatch):
    env = FakePython(monkeypatch, EVERYTHING)

    def never(*args):
        raise AssertionError("nothing should be asked or installed")

    assert deps.ensure_dependencies(progress=never, confirm=never, torch_installer=never, pip_installer=never)
    assert env.calls == []


def test_fresh_slicer_gets_torch_then_the_rest_with_slicers_packages_pinned(monkeypatch):
    env = FakePython(monkeypatch, SLICER_BASE)
    asked, said = [], []
    ok = deps.ensure_dependencies(progress=said.append, confirm=lambda m: asked.append(m) or True,
                                  torch_installer=env.torch_installer, pip_installer=env.pip_installer)
    assert ok
    assert len(asked) == 1 and "PyTorch" in asked[0] and "monai>=1.3" in asked[0]
    assert [c[0] for c in env.calls] == ["torch", "pip"]
    _, requirements, constraints = env.calls[1]
    assert requirements == list(deps.REQUIREMENTS)
    # Slicer's numpy and SimpleITK, and the torch build just installed, are pinned exactly.
    assert sorted(constraints) == ["SimpleITK==2.4.0", "numpy==1.26.4", "torch==2.5.1+cu121"]
    assert not any(_name(r) in ("numpy", "SimpleITK", "torch") for r in requirements)
    assert said and said[-1] == "Python packages ready"


def test_torch_installer_only_when_torch_is_missing(monkeypatch):
    env = FakePython(monkeypatch, {**SLICER_BASE, "torch": "2.4.0", "scipy": "1.11.0"})
    assert deps.ensure_dependencies(confirm=lambda m: True, torch_installer=env.torch_installer,
                                    pip_installer=env.pip_installer)
    assert [c[0] for c in env.calls] == ["pip"]
    assert "scipy>=1.10" not in env.calls[0][1]  # already satisfied
    assert "torch==2.4.0" in env.calls[0][2]


def test_too_old_packages_count_as_missing(monkeypatch):
    env = FakePython(monkeypatch, {**EVERYTHING, "torch": "1.13.1+cu117", "scipy": "1.9.3"})
    assert deps.missing(ALL) == ["torch>=2.1", "scipy>=1.10"]
    assert deps.ensure_dependencies(torch_installer=env.torch_installer, pip_installer=env.pip_installer)
    assert env.calls[0] == ("torch",) and env.calls[1][1] == ["scipy>=1.10"]


def test_declining_installs_nothing(monkeypatch):
    env = FakePython(monkeypatch, SLICER_BASE)
    said = []
    assert deps.ensure_dependencies(progress=said.append, confirm=lambda m: False,
                                    torch_installer=env.torch_installer, pip_installer=env.pip_installer) is False
    assert env.calls == [] and "declined" in said[-1]


def test_declining_in_the_pytorch_dialog_stops_before_pip(monkeypatch):
    env = FakePython(monkeypatch, SLICER_BASE)
    assert deps.ensure_dependencies(confirm=lambda m: True, torch_installer=lambda: False,
                                    pip_installer=env.pip_installer) is False
    assert env.calls == []


def test_failed_installation_is_an_error_naming_what_is_missing(monkeypatch):
    FakePython(monkeypatch, {k: v for k, v in EVERYTHING.items() if k != "monai"})
    with pytest.raises(deps.DependencyError, match="monai"):
        deps.ensure_dependencies(pip_installer=lambda reqs, cons: None)  # pip "succeeds" but installs nothing
    with pytest.raises(deps.DependencyError, match="no way to install"):
        deps.ensure_dependencies()


def test_version_comparison():
    assert deps._release("2.5.1+cu121") == (2, 5, 1) and deps._release("0.14.1rc1") == (0, 14, 1)
    assert deps._at_least("1.3", (1, 3, 0)) and deps._at_least("1.10.0", (1, 9))
    assert not deps._at_least("1.2.9", (1, 3)) and not deps._at_least("0.9", (1, 0, 2))
    with pytest.raises(ValueError):
        deps._parse("numpy==1.0")


def test_missing_on_this_python_reads_real_metadata():
    assert deps.missing(ALL) == []  # the project's venv has everything inference needs
    assert deps.missing(["numpy>=1.0", "numpy>=999", "no-such-package-brainanomaly"]) == [
        "numpy>=999", "no-such-package-brainanomaly"]
    assert {c.split("==")[0] for c in deps.constraints()} == {"numpy", "SimpleITK", "torch"}


def test_checking_imports_neither_torch_nor_the_other_packages():
    code = ("import sys; sys.path.insert(0, 'BrainAnomaly'); from BrainAnomalySlicer import dependencies as d; "
            "d.missing([d.TORCH_REQUIREMENT, *d.REQUIREMENTS]); d.constraints(); "
            "heavy = {'torch', 'monai', 'scipy', 'nilearn', 'deepbet', 'matplotlib', 'slicer', 'SimpleITK'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_requirements_match_pyproject_and_the_pinned_versions():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    assert sorted(ALL) == sorted(d for d in declared if _name(d) not in deps.PROTECTED)
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
                if "==" in line and not line.startswith("#"))
    for req in ALL:
        name, minimum = deps._parse(req)
        assert deps._at_least(pins[name], minimum), f"requirements.txt pins {name} {pins[name]}, below {req}"


def test_every_third_party_import_of_the_library_is_covered():
    """A new import in BrainAnomalyLib must come with a requirement here, or Slicer users get ImportError; the one
    exception is a CLI-only engine that pyproject.toml declares as an extra (Dask: `detect --dask`), which Slicer
    never runs."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    covered = ({deps._import_name(_name(r)).lower() for r in ALL}
               | {deps._import_name(p).lower() for p in deps.PROTECTED}
               | {deps._import_name(_name(r)).lower() for r in extras["dask"]})
    covered.add("simpleitk")
    found = set()
    for path in (ROOT / "BrainAnomalyLib").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    third_party = {m for m in found if m not in sys.stdlib_module_names and m != "BrainAnomalyLib"}
    assert third_party and {m.lower() for m in third_party} <= covered, third_party


# ----------------------------------------------------------------------------------------------------------------
# the real installers, against fake slicer and PyTorchUtils modules


@pytest.fixture
def fake_slicer(monkeypatch):
    calls = []
    slicer = types.ModuleType("slicer")
    slicer.util = types.SimpleNamespace(pip_install=lambda args: calls.append(("pip_install", list(args),
                                                                                Path(args[-1]).read_text(encoding="utf-8"))))
    monkeypatch.setitem(sys.modules, "slicer", slicer)
    return slicer, calls


def test_slicer_pip_installer_uses_pip_ensure_with_a_constraints_file(fake_slicer, monkeypatch):
    slicer, calls = fake_slicer
    pydeps = types.ModuleType("slicer.pydeps")

    def pip_ensure(requirements, constraints=None, prompt_install=True, requester=None):
        calls.append(("pip_ensure", [str(r) for r in requirements], Path(constraints).read_text(encoding="utf-8"),
                      prompt_install, requester, constraints))

    pydeps.pip_ensure = pip_ensure
    monkeypatch.setitem(sys.modules, "slicer.pydeps", pydeps)
    _, pip_installer = deps.slicer_installers()
    pip_installer(["monai>=1.3", "einops>=0.7"], ["numpy==1.26.4", "SimpleITK==2.4.0"])
    (kind, reqs, text, prompt, requester, path), = calls
    assert kind == "pip_ensure" and reqs == ["monai>=1.3", "einops>=0.7"]
    assert text.split() == ["numpy==1.26.4", "SimpleITK==2.4.0"]
    assert prompt is False and requester == "BrainAnomaly"
    assert not Path(path).exists()  # the constraints file is removed afterwards


def test_slicer_pip_installer_asks_slicer_512_to_install_under_testing(fake_slicer, monkeypatch):
    # Slicer >= 5.12's pip_ensure skips installs in --testing mode unless told not to; the self-test needs them.
    slicer, calls = fake_slicer
    pydeps = types.ModuleType("slicer.pydeps")

    def pip_ensure(requirements, constraints=None, skip_packages=None, prompt_install=True, prompt_restart=True,
                   requester=None, skip_in_testing=True, show_progress=True):
        calls.append(skip_in_testing)

    pydeps.pip_ensure = pip_ensure
    monkeypatch.setitem(sys.modules, "slicer.pydeps", pydeps)
    _, pip_installer = deps.slicer_installers()
    pip_installer(["monai>=1.3"], [])
    assert calls == [False]


def test_slicer_pip_installer_falls_back_to_pip_install(fake_slicer, monkeypatch):
    slicer, calls = fake_slicer
    monkeypatch.setitem(sys.modules, "slicer.pydeps", None)  # an older Slicer: no such module
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)
    _, pip_installer = deps.slicer_installers()
    pip_installer(["monai>=1.3"], ["numpy==1.26.4"])
    (kind, args, text), = calls
    assert kind == "pip_install" and args[:2] == ["monai>=1.3", "-c"] and text.split() == ["numpy==1.26.4"]
    assert not Path(args[-1]).exists()


def test_slicer_torch_installer_needs_the_pytorch_extension(fake_slicer, monkeypatch):
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)
    torch_installer, _ = deps.slicer_installers()
    with pytest.raises(deps.DependencyError, match="Extensions Manager"):
        torch_installer()

    asked = []

    class Logic:
        def installTorch(self, askConfirmation=False, torchVersionRequirement=None):
            asked.append((askConfirmation, torchVersionRequirement))
            return None if len(asked) == 1 else types.ModuleType("torch")

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=Logic))
    torch_installer, _ = deps.slicer_installers()
    assert torch_installer() is False  # the user declined in the PyTorch dialog
    assert torch_installer() is True
    assert asked[0] == (True, ">=2.1")
