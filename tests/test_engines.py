"""FREESEG_ENGINE: how auto resolves, the OpenVINO engine and its cache of converted networks, the fallback."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from backend.models import engines
from backend.models.assembly import load_model_parts
from backend.models.engines import feature_extractor, resolve_engine
from backend.models.identity import feature_settings
from backend.pipeline.features import FeatureNetwork
from backend.pipeline.sd_text import StableDiffusionText
from backend.settings import Settings

openvino = pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def network(tiny_settings: Settings) -> FeatureNetwork:
    parts = load_model_parts(tiny_settings)
    text = StableDiffusionText(parts.stable_diffusion, torch.device("cpu"))
    return FeatureNetwork(parts.stable_diffusion, feature_settings(tiny_settings), text)


@pytest.fixture(scope="module")
def photos(china: np.ndarray) -> list[np.ndarray]:
    return [china, np.ascontiguousarray(china[::-1, ::2])]


def test_auto_is_openvino_for_bfloat16_on_a_cpu_that_has_it_and_torch_elsewhere(monkeypatch):
    cpu, cuda, bf16 = torch.device("cpu"), torch.device("cuda"), torch.bfloat16
    assert resolve_engine("auto", cpu, bf16) == "openvino"
    assert resolve_engine("auto", cpu, torch.float32) == "torch"  # AVX2-only CPUs: no gain (docs/benchmarks.md)
    assert resolve_engine("auto", cuda, torch.float16) == "torch"
    assert resolve_engine("compile", cuda, torch.float16) == "compile"
    assert resolve_engine("openvino", cpu, torch.float32) == "openvino"
    monkeypatch.setattr(engines, "openvino_installed", lambda: False)
    assert resolve_engine("auto", cpu, bf16) == "torch"


def test_an_unknown_engine_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("FREESEG_ENGINE", "tensorrt")
    with pytest.raises(ValidationError, match="engine"):
        Settings()


@pytest.mark.slow
def test_openvino_gives_the_eager_features_and_converts_only_once(network, photos, tmp_path, monkeypatch):
    eager = feature_extractor(network, "torch", tmp_path, "fingerprint")
    converted = feature_extractor(network, "openvino", tmp_path, "fingerprint")
    assert (eager.engine, converted.engine) == ("torch", "openvino")
    [folder] = tmp_path.iterdir()
    assert folder.name.startswith("fingerprint-") and folder.name.endswith("-openvino")
    assert (folder / "features.xml").exists() and (folder / "features.bin").exists()

    expected, actual = eager(photos), converted(photos)  # a batch of two, though converted from one image
    assert actual.shape == expected.shape and actual.dtype == np.float16
    assert np.linalg.norm(actual.astype(np.float32) - expected) / np.linalg.norm(expected.astype(np.float32)) < 1e-2

    def no_conversion(*args, **kwargs):
        raise AssertionError("the converted network was not read from the cache")

    monkeypatch.setattr(openvino, "convert_model", no_conversion)
    cached = feature_extractor(network, "openvino", tmp_path, "fingerprint")
    assert cached.engine == "openvino"
    np.testing.assert_array_equal(cached(photos), actual)


@pytest.mark.slow
def test_other_weights_under_the_same_names_are_converted_anew(network, tmp_path):
    feature_extractor(network, "openvino", tmp_path, "fingerprint")
    first = engines.weights_digest(network)
    parameter = next(network.parameters())
    with torch.no_grad():
        parameter.add_(1.0)
    try:
        assert engines.weights_digest(network) != first
        feature_extractor(network, "openvino", tmp_path, "fingerprint")
        assert len(list(tmp_path.iterdir())) == 2
    finally:
        with torch.no_grad():
            parameter.sub_(1.0)


def test_an_engine_that_fails_falls_back_to_torch_and_says_why(network, photos, tmp_path, monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("no CPU plugin")

    monkeypatch.setitem(engines._BUILDERS, "openvino", broken)
    caplog.set_level(logging.WARNING, logger="backend.models.engines")
    extractor = feature_extractor(network, "openvino", tmp_path, "fingerprint")
    assert extractor.engine == "torch"
    assert "FREESEG_ENGINE=openvino" in caplog.text and "no CPU plugin" in caplog.text and "torch" in caplog.text
    np.testing.assert_array_equal(extractor(photos), feature_extractor(network, "torch", tmp_path, "x")(photos))


@pytest.mark.slow
def test_the_segmenter_predicts_through_openvino(tiny_settings, china):
    from backend.models.process import process_segmenter
    from backend.options import SegmentOptions
    from backend.pipeline.vocabulary import labels_from_names

    settings = tiny_settings.model_copy(update={"engine": "openvino"})
    segmenter = process_segmenter(settings)
    assert segmenter.features.engine == "openvino"
    segmentation = segmenter.segment_image(china, labels_from_names(["sky", "building", "tree"]),
                                           SegmentOptions(refine="none"))
    assert segmentation.label_map.shape == china.shape[:2]
    assert segmentation.regions


def test_a_compile_that_fails_leaves_the_network_in_the_layout_eager_runs(network, photos, tmp_path, monkeypatch):
    expected = feature_extractor(network, "torch", tmp_path, "x")(photos)

    def no_inductor(module, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", no_inductor)
    extractor = feature_extractor(network, "compile", tmp_path, "fingerprint")
    assert extractor.engine == "torch"
    convolution = next(m for m in network.modules() if isinstance(m, torch.nn.Conv2d))
    assert convolution.weight.is_contiguous()  # not channels-last
    np.testing.assert_array_equal(extractor(photos), expected)


@pytest.mark.parametrize("engine", ["openvino", "compile"])
def test_an_engine_that_fails_for_taesd_falls_back_to_torch(tiny_settings, photos, tmp_path, monkeypatch, caplog,
                                                            engine):
    parts = load_model_parts(tiny_settings.model_copy(update={"encoder": "taesd"}))
    taesd = FeatureNetwork(parts.stable_diffusion, feature_settings(tiny_settings),
                           StableDiffusionText(parts.stable_diffusion, torch.device("cpu")))

    def broken(*args):
        raise RuntimeError(f"{engine} cannot run TAESD here")

    monkeypatch.setitem(engines._BUILDERS, engine, broken)
    caplog.set_level(logging.WARNING, logger="backend.models.engines")
    extractor = feature_extractor(taesd, engine, tmp_path, "fingerprint")
    assert extractor.engine == "torch" and f"FREESEG_ENGINE={engine}" in caplog.text and "TAESD" in caplog.text
    np.testing.assert_array_equal(extractor(photos), feature_extractor(taesd, "torch", tmp_path, "x")(photos))


@pytest.mark.slow
def test_openvino_runs_taesd_as_torch_does(tiny_settings, photos, tmp_path):
    parts = load_model_parts(tiny_settings.model_copy(update={"encoder": "taesd"}))
    taesd = FeatureNetwork(parts.stable_diffusion, feature_settings(tiny_settings),
                           StableDiffusionText(parts.stable_diffusion, torch.device("cpu")))
    expected = feature_extractor(taesd, "torch", tmp_path, "x")(photos)
    converted = feature_extractor(taesd, "openvino", tmp_path, "taesd")
    assert converted.engine == "openvino"
    actual = converted(photos)
    assert np.linalg.norm(actual.astype(np.float32) - expected) / np.linalg.norm(expected.astype(np.float32)) < 1e-2
