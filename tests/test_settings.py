from pathlib import Path

import pytest
from pydantic import ValidationError

from backend.settings import Settings


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
    assert settings.captioner_source == "Salesforce/blip-image-captioning-base"


def test_defaults_follow_the_paper():
    settings = Settings()
    assert (settings.k, settings.refine, settings.captioner, settings.feature_grid) == (4, "crf", "blip2", 32)
    assert settings.captioner_source == "Salesforce/blip2-opt-2.7b"


@pytest.mark.parametrize("name, value", [("FREESEG_REFINE", "fancy"), ("FREESEG_K", "1"), ("FREESEG_IMAGE_SIZE", "500")])
def test_invalid_values_are_rejected(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.removeprefix("FREESEG_").lower()):
        Settings()
