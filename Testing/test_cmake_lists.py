"""The extension's CMake lists name every file the installed module needs, and only files that exist: every .py of
BrainAnomalyLib and of the module folder, and every file of Resources/{Icons,UI,Models} (a shipped model's sha256
covers its whole folder, so a missing MODEL_CARD.md would make the installed model look tampered with). Files are
listed one by one, so adding or deleting one without updating CMake fails here rather than in a Slicer build."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROOT_CMAKE = ROOT / "CMakeLists.txt"
MODULE_DIR = ROOT / "BrainAnomaly"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
RESOURCE_DIRS = ("Resources/Icons", "Resources/UI", "Resources/Models")


def _strip_comments(text: str) -> str:
    # CMake comments run from an unquoted '#' to the end of the line; the lists here hold no quoted '#'.
    return "\n".join(re.sub(r'#(?=(?:[^"]*"[^"]*")*[^"]*$).*', "", line) for line in text.splitlines())


def _commands(text: str, name: str) -> List[List[str]]:
    """Arguments of every call of command `name` (case-insensitive), split on whitespace, quotes removed."""
    out = []
    for m in re.finditer(rf"(?i)\b{re.escape(name)}\s*\((.*?)\)", _strip_comments(text), re.S):
        out.append([tok.strip('"') for tok in m.group(1).split()])
    return out


def _variables(text: str) -> Dict[str, List[str]]:
    """set(NAME values...) as NAME -> values, with ${VAR} of single-valued variables substituted."""
    variables: Dict[str, List[str]] = {}
    for args in _commands(text, "set"):
        if not args:
            continue
        values = []
        for tok in args[1:]:
            for var, val in variables.items():
                if len(val) == 1:
                    tok = tok.replace("${" + var + "}", val[0])
            values.append(tok)
        variables[args[0]] = values
    return variables


def _listed(cmake: Path, names) -> List[str]:
    variables = _variables(cmake.read_text(encoding="utf-8"))
    out = []
    for name in names:
        assert name in variables, f"{cmake.relative_to(ROOT)} sets no {name}"
        out += variables[name]
    return out


def module_files() -> List[str]:
    """Module CMake entries as paths relative to the repository root."""
    files = _listed(MODULE_CMAKE, ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES"))
    return [(MODULE_DIR / f).resolve().relative_to(ROOT).as_posix() for f in files]


def root_files() -> List[str]:
    return _listed(ROOT_CMAKE, ("BRAINANOMALY_LIB_SCRIPTS", "BRAINANOMALY_RESOURCES"))


def _tree(folder: Path, pattern: str) -> List[str]:
    return sorted(p.relative_to(ROOT).as_posix() for p in folder.rglob(pattern)
                  if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc"))


def test_every_module_and_library_python_file_is_listed():
    listed = set(module_files()) | set(root_files())
    wanted = _tree(ROOT / "BrainAnomalyLib", "*.py") + _tree(MODULE_DIR, "*.py")
    missing = [f for f in wanted if f not in listed]
    assert not missing, f"add these to the CMake lists: {missing}"


@pytest.mark.parametrize("folder", RESOURCE_DIRS)
def test_every_resource_is_listed(folder):
    listed = set(root_files())
    missing = [f for f in _tree(ROOT / folder, "*") if f not in listed]
    assert not missing, f"add these to BRAINANOMALY_RESOURCES in CMakeLists.txt: {missing}"


def test_every_listed_file_exists_once():
    for files in (module_files(), root_files()):
        assert len(files) == len(set(files)), "a file is listed twice"
        gone = [f for f in files if not (ROOT / f).is_file()]
        assert not gone, f"listed in CMake but not in the tree: {gone}"


def test_installed_layout():
    """Module files stay inside the module folder (no '../', which would install one folder too high); the root
    lists hold only the library and the shared resources; the root call copies them, relative to the root, into
    the folder the module is installed to."""
    entries = _listed(MODULE_CMAKE, ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES"))
    assert not [f for f in entries if f.startswith("..") or f.startswith("/")]
    assert "BrainAnomaly.py" in entries
    assert all(f.startswith("BrainAnomalyLib/") and f.endswith(".py") for f in _listed(
        ROOT_CMAKE, ("BRAINANOMALY_LIB_SCRIPTS",)))
    assert all(f.startswith(RESOURCE_DIRS) for f in _listed(ROOT_CMAKE, ("BRAINANOMALY_RESOURCES",)))
    (call,) = _commands(ROOT_CMAKE.read_text(encoding="utf-8"), "ctkMacroCompilePythonScript")
    args = dict(zip(call, call[1:]))
    assert args["SCRIPTS"] == "${BRAINANOMALY_LIB_SCRIPTS}" and args["RESOURCES"] == "${BRAINANOMALY_RESOURCES}"
    assert args["SOURCE_DIR"] == "${CMAKE_CURRENT_SOURCE_DIR}"
    assert args["DESTINATION_DIR"] == "${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}"
    assert args["INSTALL_DIR"] == "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}"
    assert "NO_INSTALL_SUBDIR" in call  # install the folder's content, not a qt-scripted-modules/ inside it
    (module_call,) = _commands(MODULE_CMAKE.read_text(encoding="utf-8"), "slicerMacroBuildScriptedModule")
    assert "${MODULE_PYTHON_SCRIPTS}" in module_call and "${MODULE_PYTHON_RESOURCES}" in module_call
    assert "add_subdirectory(BrainAnomaly)" in ROOT_CMAKE.read_text(encoding="utf-8")


def test_no_glob():
    for cmake in (ROOT_CMAKE, MODULE_CMAKE):
        assert not re.search(r"(?i)\bfile\s*\(\s*GLOB", _strip_comments(cmake.read_text(encoding="utf-8"))), cmake


def test_the_ui_file_the_widget_loads_is_installed():
    assert "Resources/UI/BrainAnomaly.ui" in root_files()
    assert '"UI" / "BrainAnomaly.ui"' in (MODULE_DIR / "BrainAnomalySlicer" / "widget.py").read_text(encoding="utf-8")


def test_self_test_is_registered_with_ctest():
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text.split("if(BUILD_TESTING)", 1)[1]
    assert "class BrainAnomalyTest(ScriptedLoadableModuleTest)" in (MODULE_DIR / "BrainAnomaly.py").read_text(
        encoding="utf-8")


def test_licence_file_matches_the_declared_licence():
    # The Extensions Index needs a LICENSE at the root; pyproject.toml declares which one.
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_contributors_are_name_and_organisation():
    # The Extensions Index form: "Name (Organisation)", comma-separated; the module says the same.
    line = re.search(r'set\(EXTENSION_CONTRIBUTORS "([^"]*)"\)', ROOT_CMAKE.read_text(encoding="utf-8"))
    people = line.group(1).split(", ")
    assert people and all(re.fullmatch(r"[^()]+ \([^()]+\)", p.strip()) for p in people), people
    module = (MODULE_DIR / "BrainAnomaly.py").read_text(encoding="utf-8")
    assert all(f'"{p}"' in module for p in people)


def test_extension_description_is_filled_in():
    variables = _variables(ROOT_CMAKE.read_text(encoding="utf-8"))
    for field in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        values = variables.get(f"EXTENSION_{field}")
        assert values and all(v.strip() for v in values), f"EXTENSION_{field} is empty"
    assert variables["EXTENSION_DEPENDS"] == ["PyTorch"]
    icon = variables["EXTENSION_ICONURL"][0]
    assert icon.endswith("/Resources/Icons/BrainAnomaly.png") and (ROOT / "Resources/Icons/BrainAnomaly.png").is_file()
    for url in variables["EXTENSION_SCREENSHOTURLS"]:
        assert url.startswith("https://")
        local = ROOT / url.split("/main/", 1)[-1]
        assert local.is_file(), f"screenshot {url} has no file at {local.relative_to(ROOT)}"


def test_parser_sees_what_cmake_sees():
    text = 'set(A x)\nset(L\n  ${A}/one.py  # comment ${A}/ignored.py\n  "two.py"\n  )\n# set(L nothing)\n'
    assert _variables(text)["L"] == ["x/one.py", "two.py"]
