"""Importing, fetching and verifying models: what gets installed, what is refused, and that a refusal or a cancel
leaves nothing behind. Offline: downloads use file:// URLs."""

import hashlib
import json
import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest

from BrainAnomalyLib.store import model_store
from BrainAnomalyLib.cli.main import main
from BrainAnomalyLib.core.errors import BadInputError, Cancelled, ModelError
from BrainAnomalyLib.store.models import list_models, load_model, resources_dir, save_model, user_models_dir
from BrainAnomalyLib.core.progress import CancelToken, Reporter

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def models_dir(tmp_path, monkeypatch):
    """Every test installs into its own folder, never into ~/.brainanomaly."""
    folder = tmp_path / "user-models"
    monkeypatch.setenv("BRAINANOMALY_MODELS_DIR", str(folder))
    return folder


def make_model(folder: Path, name: str = "my-intensity", description: str = "test model") -> Path:
    """A small real model: an intensity scorer plus a tensor file, so there is a checksummed file to tamper with."""
    from BrainAnomalyLib.detection.postprocess import PostprocessConfig
    from BrainAnomalyLib.preprocess.chain import PreprocessConfig
    from BrainAnomalyLib.core.template import Grid
    from BrainAnomalyLib.training.run import base_meta

    meta = base_meta("intensity", name, "T1", description, Grid(), PreprocessConfig(), PostprocessConfig(),
                     {"direction": "hypo"})
    save_model(folder, meta, {"offset": np.arange(8, dtype=np.float32)})
    (folder / "MODEL_CARD.md").write_text("# test model\n")
    return folder


def zip_folder(folder: Path, archive: Path, nested: bool) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(folder.rglob("*")):
            rel = p.relative_to(folder.parent if nested else folder).as_posix()
            zf.write(p, rel)
    return archive


def everything_under(folder: Path):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------------------------------------------
# import


def test_import_from_folder_installs_a_loadable_model_that_is_listed(tmp_path, models_dir):
    src = make_model(tmp_path / "src")
    installed = model_store.import_model(src)
    assert installed == models_dir / "my-intensity"
    assert load_model(installed).kind == "intensity"
    assert (installed / "MODEL_CARD.md").read_text(encoding="utf-8") == "# test model\n"
    assert everything_under(models_dir) == ["my-intensity", "my-intensity/MODEL_CARD.md",
                                            "my-intensity/model.json", "my-intensity/model.safetensors"]
    row = next(r for r in list_models() if r["id"] == "my-intensity")
    assert row["source"] == "user" and row["inputs"] == ["T1"]
    assert row["size_bytes"] == model_store.folder_size(installed) > 0
    assert src.is_dir()  # the source is copied, not moved


@pytest.mark.parametrize("nested", [False, True], ids=["files-at-top", "folder-at-top"])
def test_import_from_zip_either_layout(tmp_path, models_dir, nested):
    archive = zip_folder(make_model(tmp_path / "src"), tmp_path / "model.zip", nested)
    installed = model_store.import_model(archive)
    assert installed == models_dir / "my-intensity"
    assert load_model(installed).tensors["offset"].tolist() == list(range(8))
    assert [p.name for p in models_dir.iterdir()] == ["my-intensity"]  # no staging left


def test_entry_for_matches_the_registry_format(tmp_path):
    folder = model_store.import_model(make_model(tmp_path / "src"))
    entry = model_store.entry_for(load_model(folder).meta, folder)
    assert set(model_store.REGISTRY_FIELDS) <= set(entry)
    assert entry["id"] == "my-intensity" and entry["source"] == "user" and entry["inputs"] == ["T1"]
    from BrainAnomalyLib.core.files import folder_digest

    assert entry["sha256"] == folder_digest(folder) and entry["size_bytes"] == model_store.folder_size(folder)


@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_tampered_model_is_refused_and_nothing_is_left(tmp_path, models_dir, as_zip):
    src = make_model(tmp_path / "src")
    flip_a_byte(src / "model.safetensors")
    source = zip_folder(src, tmp_path / "model.zip", nested=True) if as_zip else src
    with pytest.raises(ModelError, match="broken or tampered"):
        model_store.import_model(source)
    assert everything_under(models_dir) == []


def test_model_json_that_is_not_text_is_refused(tmp_path, models_dir):
    src = make_model(tmp_path / "src")
    flip_a_byte(src / "model.json")  # the trailing newline becomes a byte that is not UTF-8
    with pytest.raises(ModelError, match="unreadable model.json"):
        model_store.import_model(src)
    assert everything_under(models_dir) == []


def test_model_with_unknown_kind_is_refused(tmp_path, models_dir):
    src = make_model(tmp_path / "src")
    meta = json.loads((src / "model.json").read_text(encoding="utf-8"))
    meta["kind"] = "no-such-scorer"
    (src / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="unknown scorer kind"):
        model_store.import_model(src)
    assert everything_under(models_dir) == []


def _zip_with_extra(tmp_path: Path, name: str, data: bytes = b"x", mode: int = 0o100644) -> Path:
    archive = zip_folder(make_model(tmp_path / "src"), tmp_path / "model.zip", nested=False)
    with zipfile.ZipFile(archive, "a") as zf:
        info = zipfile.ZipInfo(name)
        info.external_attr = mode << 16
        zf.writestr(info, data)
    return archive


@pytest.mark.parametrize("member", ["../escaped.txt", "sub/../../escaped.txt", "/tmp/brainanomaly-abs.txt",
                                    "..\\escaped.txt"])
def test_zip_slip_is_refused(tmp_path, models_dir, member):
    archive = _zip_with_extra(tmp_path, member)
    with pytest.raises(ModelError, match="unsafe path"):
        model_store.import_model(archive)
    assert everything_under(models_dir) == []
    assert not (tmp_path / "escaped.txt").exists() and not (models_dir.parent / "escaped.txt").exists()
    assert not Path("/tmp/brainanomaly-abs.txt").exists()


def test_zip_with_symlink_is_refused(tmp_path, models_dir):
    archive = _zip_with_extra(tmp_path, "link", b"/etc/passwd", mode=stat.S_IFLNK | 0o777)
    with pytest.raises(ModelError, match="symbolic link"):
        model_store.import_model(archive)
    assert everything_under(models_dir) == []


def test_folder_with_symlink_is_refused(tmp_path, models_dir):
    src = make_model(tmp_path / "src")
    (tmp_path / "secret.txt").write_text("secret")
    (src / "notes.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(ModelError, match="symbolic link"):
        model_store.import_model(src)
    assert everything_under(models_dir) == []


def test_oversized_zip_is_refused(tmp_path, models_dir, monkeypatch):
    archive = _zip_with_extra(tmp_path, "big.bin", b"\0" * 50_000)
    monkeypatch.setattr(model_store, "MAX_MODEL_BYTES", 20_000)
    with pytest.raises(ModelError, match="GB"):
        model_store.import_model(archive)
    assert everything_under(models_dir) == []


def test_zip_without_a_model_and_non_model_inputs(tmp_path, models_dir):
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("readme.txt", "no model here")
    with pytest.raises(ModelError, match="holds no model"):
        model_store.import_model(empty)
    (tmp_path / "not-a-zip.zip").write_text("plain text")
    with pytest.raises(BadInputError, match="neither a model folder nor a .zip"):
        model_store.import_model(tmp_path / "not-a-zip.zip")
    with pytest.raises(BadInputError, match="does not exist"):
        model_store.import_model(tmp_path / "nowhere")
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(ModelError, match="not a model folder"):
        model_store.import_model(tmp_path / "empty-folder")
    assert everything_under(models_dir) == []


def test_overwrite_is_refused_unless_asked(tmp_path, models_dir):
    model_store.import_model(make_model(tmp_path / "v1", description="first"))
    newer = make_model(tmp_path / "v2", description="second")
    with pytest.raises(model_store.ModelExistsError, match="already installed"):
        model_store.import_model(newer)
    assert load_model(models_dir / "my-intensity").meta["description"] == "first"
    model_store.import_model(newer, overwrite=True)
    assert load_model(models_dir / "my-intensity").meta["description"] == "second"
    assert [p.name for p in models_dir.iterdir()] == ["my-intensity"]


@pytest.mark.parametrize("name", ["intensity-t1", "Normative-T1-IXI"])
def test_name_of_a_shipped_model_is_refused(tmp_path, models_dir, name):
    with pytest.raises(ModelError, match="shipped model"):
        model_store.import_model(make_model(tmp_path / "src", name=name))
    assert everything_under(models_dir) == []


def test_model_name_is_sanitised_into_the_models_folder(tmp_path, models_dir):
    installed = model_store.import_model(make_model(tmp_path / "src", name="../../my model/v2"), dest_dir=models_dir)
    assert installed.parent == models_dir and installed.name == "my-model-v2"
    assert not (tmp_path / "my model").exists()


# ----------------------------------------------------------------------------------------------------------------
# fetch


def _published(tmp_path: Path):
    archive = zip_folder(make_model(tmp_path / "src"), tmp_path / "published.zip", nested=True)
    return archive.as_uri(), hashlib.sha256(archive.read_bytes()).hexdigest()


def test_fetch_with_the_right_sha256_installs(tmp_path, models_dir):
    url, digest = _published(tmp_path)
    seen = []
    installed = model_store.fetch_model(url, digest.upper(), reporter=Reporter(lambda s, f: seen.append((s, f))))
    assert installed == models_dir / "my-intensity" and load_model(installed).kind == "intensity"
    assert [p.name for p in models_dir.iterdir()] == ["my-intensity"]
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert "download model" in {s for s, _ in seen}


def test_fetch_with_a_wrong_sha256_installs_nothing(tmp_path, models_dir):
    url, digest = _published(tmp_path)
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    with pytest.raises(ModelError, match="broken or tampered"):
        model_store.fetch_model(url, wrong)
    assert everything_under(models_dir) == []


def test_fetch_rejects_bad_arguments(tmp_path, models_dir):
    url, digest = _published(tmp_path)
    with pytest.raises(BadInputError, match="64 hex"):
        model_store.fetch_model(url, "abc")
    with pytest.raises(BadInputError, match="only http, https and file"):
        model_store.fetch_model("ftp://example.org/model.zip", digest)
    with pytest.raises(ModelError, match="could not download"):
        model_store.fetch_model((tmp_path / "missing.zip").as_uri(), digest)
    assert everything_under(models_dir) == []


def test_cancel_during_fetch_leaves_nothing(tmp_path, models_dir, monkeypatch):
    url, digest = _published(tmp_path)
    monkeypatch.setattr(model_store, "_CHUNK", 256)  # many chunks, so the cancel lands mid-download
    token = CancelToken()
    calls = []

    def progress(step, fraction):
        calls.append(fraction)
        if len(calls) == 2:  # a chunk has been written by now
            token.cancel()

    with pytest.raises(Cancelled):
        model_store.fetch_model(url, digest, reporter=Reporter(progress, token))
    assert len(calls) == 2
    assert everything_under(models_dir) == []


# ----------------------------------------------------------------------------------------------------------------
# registry


def test_shipped_registry_is_intact():
    assert model_store.verify_registry() == []


@pytest.fixture
def resources_copy(tmp_path, monkeypatch):
    copy = tmp_path / "Resources"
    shutil.copytree(resources_dir() / "Models", copy / "Models")
    monkeypatch.setenv("BRAINANOMALY_RESOURCES", str(copy))
    assert model_store.verify_registry() == []  # the copy itself is intact
    return copy / "Models"


def test_verify_registry_finds_a_tampered_file(resources_copy):
    # MODEL_CARD.md is not listed in model.json, so only the registry digest and size can catch this.
    card = resources_copy / "intensity-t1" / "MODEL_CARD.md"
    card.write_text(card.read_text(encoding="utf-8") + "tampered\n", encoding="utf-8")
    problems = model_store.verify_registry()
    assert any("intensity-t1" in p and "broken or tampered" in p for p in problems)
    assert any("intensity-t1" in p and "bytes" in p for p in problems)
    assert not any("normative-t1-ixi" in p for p in problems)


def test_verify_registry_finds_same_size_corruption_and_bad_entries(resources_copy):
    flip_a_byte(resources_copy / "normative-t1-ixi" / "model.safetensors")
    registry = resources_copy / "models.json"
    data = json.loads(registry.read_text(encoding="utf-8"))
    del data["models"][1]["description"]
    data["models"].append({"id": "ghost", "path": "ghost", "version": "1", "kind": "intensity", "modality": "T1",
                           "inputs": ["T1"], "size_bytes": 1, "sha256": "0" * 64, "description": ""})
    registry.write_text(json.dumps(data))
    problems = model_store.verify_registry()
    assert any(p.startswith("normative-t1-ixi") and "broken or tampered" in p for p in problems)
    assert not any(p.startswith("normative-t1-ixi") and "bytes" in p for p in problems)  # same size
    assert any(p.startswith("intensity-t1") and "lacks description" in p for p in problems)
    assert any(p.startswith("ghost") and "missing" in p for p in problems)


# ----------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_models_import_list_and_exit_codes(tmp_path, models_dir, capsys):
    src = make_model(tmp_path / "src")
    assert main(["models", "import", str(src)]) == 0
    assert "my-intensity" in capsys.readouterr().out
    assert main(["models", "import", str(src)]) == 3
    assert "--overwrite" in capsys.readouterr().err
    assert main(["models", "import", str(src), "--overwrite"]) == 0
    assert main(["models", "import", str(tmp_path / "nowhere")]) == 2
    flip_a_byte(src / "model.safetensors")
    assert main(["models", "import", str(src), "--overwrite"]) == 3
    assert load_model(models_dir / "my-intensity").kind == "intensity"  # the installed one is untouched
    capsys.readouterr()
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "my-intensity" in listing and "intensity-t1" in listing
    assert user_models_dir() == models_dir


def test_cli_models_fetch(tmp_path, models_dir, capsys):
    url, digest = _published(tmp_path)
    assert main(["models", "fetch", url, "--sha256", "f" * 64, "-q"]) == 3
    assert main(["models", "fetch", url, "--sha256", "nothex", "-q"]) == 2
    assert everything_under(models_dir) == []
    assert main(["models", "fetch", url, "--sha256", digest, "-q"]) == 0
    assert (models_dir / "my-intensity" / "model.json").is_file()


def test_cli_models_verify(resources_copy, capsys):
    assert main(["models", "verify"]) == 0
    assert "intact" in capsys.readouterr().out
    flip_a_byte(resources_copy / "intensity-t1" / "model.json")
    assert main(["models", "verify"]) == 3
    assert "intensity-t1" in capsys.readouterr().err
