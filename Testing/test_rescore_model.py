"""scripts/rescore_model.py: a trained learned model scored another way, same weights, statistics and calibration
fitted again on the same subjects."""

import importlib.util
import json
from pathlib import Path

import numpy as np

from BrainAnomalyLib.store.models import load_model

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "rescore_model.py"


def _script():
    spec = importlib.util.spec_from_file_location("rescore_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rescoring_keeps_the_weights_and_fits_statistics_and_thresholds_again(tmp_path, capsys):
    from conftest import small_grid
    from test_training import _cohort

    from BrainAnomalyLib.core.progress import Reporter
    from BrainAnomalyLib.preprocess.chain import PreprocessConfig
    from BrainAnomalyLib.training.run import train

    csv = _cohort(tmp_path)
    cache = str(tmp_path / "cache")
    arch = {"channels": [8, 8], "attention_levels": [False, False], "norm_groups": 4, "head_channels": 8,
            "train_steps": 20, "t_stars": [8], "ddim_steps": 1, "noise": "gaussian",
            "size": list(small_grid().size[1::-1])}
    # Trained as `train` does it, on the 4 mm grid: what is tested is what the script does with a trained model,
    # whose every scoring pass (statistics and calibration, each twice) is then on an eighth of the voxels.
    trained = train("ddpm", csv, "T1", tmp_path / "ddpm", Reporter(), cache_dir=Path(cache),
                    pre=PreprocessConfig(skull_strip="none", bias_correction=False, registration="none"),
                    max_train=2, allow_few_scans=True, grid=small_grid(),
                    options={"epochs": 1, "steps_per_epoch": 1, "batch_size": 4, "device": "cpu", "arch": arch,
                             "realism_samples": 0})
    assert load_model(trained).meta["grid"] == small_grid().to_dict()
    script = _script()
    out = tmp_path / "ddpm-one-level"
    assert script.main(["--model", str(trained), "--manifest", str(csv), "--cache-dir", cache, "--score", "l1",
                        "--arch", json.dumps({"t_stars": [4]}), "-o", str(out)]) == 0
    before, after = load_model(trained), load_model(out)
    assert after.meta["params"]["arch"]["t_stars"] == [4] and after.meta["params"]["score"] == "l1"
    assert after.name == "ddpm-one-level" and after.meta["rescored_from"]["model"] == before.name
    for key, value in before.tensors.items():
        if key.startswith("net."):
            np.testing.assert_array_equal(after.tensors[key], value)
    # New statistics (another map), new thresholds from the same calibration subjects.
    assert not np.allclose(after.tensors["norm.mean"], before.tensors["norm.mean"])
    assert after.meta["calibration"]["subjects"] == before.meta["calibration"]["subjects"]
    assert after.meta["calibration"]["thresholds"] != before.meta["calibration"]["thresholds"]

    # An arch that needs other weights, the model itself as output, a model that is not learned: refused, nothing
    # written.
    for argv in (["--arch", json.dumps({"channels": [8, 16]}), "-o", str(tmp_path / "wider")],
                 ["-o", str(trained)],
                 ["--arch", "[1]", "-o", str(tmp_path / "list")]):
        assert script.main(["--model", str(trained), "--manifest", str(csv), "--cache-dir", cache] + argv) == 2
    err = capsys.readouterr().err
    assert "does not take" in err and "new folder" in err and "JSON object" in err
    assert not (tmp_path / "wider").exists() and not (tmp_path / "list").exists()
