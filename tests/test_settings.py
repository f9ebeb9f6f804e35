import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from backend.cli import main
from backend.models.captioners import captioner_source
from backend.options import SegmentOptions
from backend.settings import Settings, settings_problems


def test_environment_names_operators_rely_on(monkeypatch):
    monkeypatch.setenv("FREESEG_CAPTIONER", "blip")
    monkeypatch.setenv("FREESEG_K", "5")
    monkeypatch.setenv("FREESEG_REFINE", "pamr")
    monkeypatch.setenv("FREESEG_DEVICE", "cpu")
    monkeypatch.setenv("FREESEG_MODELS", "tiny")
    monkeypatch.setenv("MODEL_DIR", "/data/models")
    settings = Settings()
    assert (settings.captioner, settings.k, settings.refine, settings.device, settings.models) == (
        "blip", 5, "pamr", "cpu", "tiny"
    )
    assert settings.model_dir == Path("/data/models")
    assert captioner_source(settings, settings.captioner) == "Salesforce/blip-image-captioning-base"


@pytest.mark.parametrize("name", ["FREESEG_WORKING_MAX_SIDE", "FREESEG_REFINE_MAX_SIDE"])
def test_the_working_size_is_read_under_its_name_and_its_former_one(monkeypatch, name):
    monkeypatch.setenv(name, "800")
    assert Settings().working_max_side == 800
    monkeypatch.setenv(name, "10")
    with pytest.raises(ValidationError) as error:
        Settings()
    # named as the setting is now called, whichever name was set (as OMP_NUM_THREADS is for FREESEG_TORCH_THREADS)
    assert settings_problems(error.value) == ["FREESEG_WORKING_MAX_SIDE=10: expected greater than or equal to 64"]


def test_the_per_request_defaults_are_the_settings_defaults():
    assert Settings().segment_options == SegmentOptions()


def test_defaults_follow_the_paper():
    settings = Settings()
    assert (settings.k, settings.refine, settings.captioner, settings.feature_grid) == (4, "crf", "auto", 32)
    assert captioner_source(settings, "blip2") == "Salesforce/blip2-opt-2.7b"  # the paper's, where a GPU holds it
    assert settings.encoder == "vae"  # the paper's; taesd is the faster choice


@pytest.mark.parametrize("name, value", [("FREESEG_REFINE", "fancy"), ("FREESEG_K", "1"), ("FREESEG_IMAGE_SIZE", "500")])
def test_invalid_values_are_rejected(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.removeprefix("FREESEG_").lower()):
        Settings()


@pytest.mark.parametrize("environment, lines", [
    ({"FREESEG_DTYPE": "fp8"}, ["FREESEG_DTYPE=fp8: expected auto, float32, bfloat16 or float16"]),
    ({"FREESEG_FIDELITY": "bogus", "FREESEG_QUEUE_SIZE": "0"},
     ["FREESEG_FIDELITY=bogus: expected default or release", "FREESEG_QUEUE_SIZE=0: expected greater than or equal to 1"]),
    ({"OMP_NUM_THREADS": "many"}, ["OMP_NUM_THREADS=many: expected a valid integer, unable to parse string as an integer"]),
    ({"FREESEG_ALLOWED_URL_HOSTS": "[a.org"},
     ["FREESEG_ALLOWED_URL_HOSTS=[a.org: expected a JSON list of host names, or names separated by commas"]),
])
def test_each_bad_setting_is_one_line_naming_the_variable_and_what_it_accepts(monkeypatch, environment, lines):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as error:
        Settings()
    assert settings_problems(error.value) == lines


@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["segment", "missing.jpg", "--labels", "cat", "--out", "out"]])
def test_a_command_with_a_bad_setting_exits_2_without_a_traceback(tiny_environment, capsys, command):
    tiny_environment.setenv("FREESEG_DTYPE", "fp8")
    tiny_environment.setenv("FREESEG_FIDELITY", "bogus")
    assert main(command) == 2
    assert capsys.readouterr().err.splitlines() == [
        "freesegdiff: FREESEG_FIDELITY=bogus: expected default or release",
        "freesegdiff: FREESEG_DTYPE=fp8: expected auto, float32, bfloat16 or float16"]


@pytest.mark.slow
def test_the_installed_command_prints_the_problem_not_a_traceback(tmp_path):
    environment = {**os.environ, "FREESEG_DTYPE": "fp8"}
    done = subprocess.run([str(Path(sys.executable).with_name("freesegdiff")), "serve"], env=environment,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "FREESEG_DTYPE=fp8: expected auto, float32, bfloat16 or float16" in done.stderr
    assert "Traceback" not in done.stderr
