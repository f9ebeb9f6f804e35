"""FREESEG_DTYPE: how auto resolves, and that encodings of one dtype are never taken for another's."""

from __future__ import annotations

import pytest
import torch

from backend.models import assembly as models
from backend.models.assembly import resolve_device
from backend.models.identity import model_version, models_fingerprint
from backend.settings import Settings


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_the_cpu_is_bfloat16_only_where_the_cpu_computes_it(monkeypatch, native, expected):
    monkeypatch.setattr(models, "cpu_has_native_bfloat16", lambda: native)
    assert resolve_device("cpu", "auto") == (torch.device("cpu"), expected)


@pytest.mark.parametrize("choice, expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                              ("float16", torch.float16)])
def test_an_explicit_dtype_is_taken_as_given(monkeypatch, choice, expected):
    monkeypatch.setattr(models, "cpu_has_native_bfloat16", lambda: True)
    assert resolve_device("cpu", choice) == (torch.device("cpu"), expected)


def test_the_dtype_setting_is_validated():
    with pytest.raises(ValueError):
        Settings(dtype="float8")


def test_the_fingerprint_and_model_version_follow_the_resolved_dtype(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "cpu_has_native_bfloat16", lambda: True)
    auto, fp32 = (Settings(models="tiny", device="cpu", dtype=d, model_dir=tmp_path) for d in ("auto", "float32"))
    assert models_fingerprint(auto, torch.bfloat16) != models_fingerprint(auto, torch.float32)
    assert model_version(auto) != model_version(fp32)
    monkeypatch.setattr(models, "cpu_has_native_bfloat16", lambda: False)
    assert model_version(auto) == model_version(fp32)  # auto resolved to float32: the same encodings
    bf16 = Settings(models="tiny", device="cpu", dtype="bfloat16", model_dir=tmp_path)
    assert model_version(bf16) != model_version(fp32)
