"""FREESEG_CAPTION_ENGINE: auto is torch, BLIP on OpenVINO gives torch's tokens, the cache of converted graphs,
the fallback to torch, and the caption agreement the bench reports."""

from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from backend.benchmark.bench import BenchConfig, run_bench
from backend.benchmark.caption_agreement import caption_agreement, photo_paths
from backend.models import caption_engines
from backend.models.caption_engines import caption_engine, captioner_on_engine, resolve_caption_engine
from backend.models.captioners import CAPTIONERS
from backend.models.loading import CaptionerParts, load_captioner
from backend.models.tiny import tiny_model_folder
from backend.pipeline.caption import Captioner

openvino = pytest.importorskip("openvino")

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_folder(tiny_settings):
    return tiny_model_folder(tiny_settings.model_dir)


@pytest.fixture(scope="module")
def blip(tiny_folder) -> CaptionerParts:
    return load_captioner("blip", str(tiny_folder / "blip"), device=CPU, dtype=torch.float32)


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return [np.random.default_rng(seed).integers(0, 256, (80 + 16 * seed, 96, 3), dtype=np.uint8) for seed in range(3)]


def _captioner(parts: CaptionerParts) -> Captioner:
    return Captioner(parts, CAPTIONERS[parts.kind].generation, CPU, torch.float32)


def test_auto_is_torch_and_openvino_is_asked_for_by_name(blip, tmp_path):
    assert resolve_caption_engine("auto") == "torch" and resolve_caption_engine("openvino") == "openvino"
    assert captioner_on_engine(blip, "auto", tmp_path) is blip and not list(tmp_path.iterdir())  # nothing converted


def test_openvino_writes_torchs_tokens_and_converts_only_once(blip, photos, tmp_path, monkeypatch):
    converted = captioner_on_engine(blip, "openvino", tmp_path)
    assert caption_engine(converted.model) == "openvino" and caption_engine(blip.model) == "torch"
    assert sum(parameter.numel() for parameter in converted.model.parameters()) == 0  # torch's weights can go
    [folder] = tmp_path.iterdir()
    assert folder.name.startswith("captioner-blip-") and folder.name.endswith("-float32-openvino-v2")
    assert {path.name for path in folder.iterdir()} == {f"{g}.{s}" for g in caption_engines.GRAPHS for s in ("xml", "bin")}
    eager, engine = _captioner(blip), _captioner(converted)
    expected = eager.token_ids(photos)  # a batch of three, with beam search over a key/value cache
    assert torch.equal(engine.token_ids(photos), expected)
    for photo, row in zip(photos, expected):
        assert torch.equal(engine.token_ids([photo])[0], row)
    assert engine(photos) == eager(photos)
    assert type(blip.model.vision_model).__name__ == "BlipVisionModel"  # the torch model is left as it was
    assert blip.model.text_decoder.forward.__self__ is blip.model.text_decoder

    def no_conversion(*args, **kwargs):
        raise AssertionError("the converted captioner was not read from the cache")

    monkeypatch.setattr(openvino, "convert_model", no_conversion)
    cached = captioner_on_engine(blip, "openvino", tmp_path)
    assert torch.equal(_captioner(cached).token_ids(photos), expected)


def test_an_engine_that_fails_captions_on_torch_and_says_why(blip, photos, tmp_path, monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("no CPU plugin")

    monkeypatch.setattr(caption_engines, "_convert", broken)
    caplog.set_level(logging.WARNING, logger="backend.models.caption_engines")
    parts = captioner_on_engine(blip, "openvino", tmp_path)
    assert parts is blip and caption_engine(parts.model) == "torch"
    assert "FREESEG_CAPTION_ENGINE=openvino" in caplog.text and "no CPU plugin" in caplog.text and "torch" in caplog.text
    assert _captioner(parts)(photos) == _captioner(blip)(photos)


def test_a_missing_engine_captions_on_torch(blip, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "openvino", None)  # asked for by name, but not installed
    caplog.set_level(logging.WARNING, logger="backend.models.caption_engines")
    assert captioner_on_engine(blip, "openvino", tmp_path) is blip
    assert "FREESEG_CAPTION_ENGINE=openvino" in caplog.text


def test_blip2_stays_on_torch(tiny_folder, tmp_path, caplog):
    blip2 = load_captioner("blip2", str(tiny_folder / "blip2"), device=CPU, dtype=torch.float32)
    assert captioner_on_engine(blip2, "auto", tmp_path) is blip2
    caplog.set_level(logging.WARNING, logger="backend.models.caption_engines")
    assert captioner_on_engine(blip2, "openvino", tmp_path) is blip2
    assert "only BLIP's captioner converts" in caplog.text and not list(tmp_path.iterdir())


def test_a_prediction_never_fails_for_the_captions_engine(tiny_settings, china, monkeypatch):
    from backend.models.process import process_segmenter
    from backend.pipeline.segmenter import SegmentOptions
    from backend.pipeline.vocabulary import labels_from_names

    def broken(*args):
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(caption_engines, "_convert", broken)
    settings = tiny_settings.model_copy(update={"captioner": "blip", "caption_engine": "openvino",
                                                "model_dir": tiny_settings.model_dir / "broken-engine"})
    segmenter = process_segmenter(settings)
    process_segmenter.cache_clear()
    assert caption_engine(segmenter.captioner.model) == "torch"
    segmentation = segmenter.segment_image(china, labels_from_names(["sky", "building"]), SegmentOptions(refine="none"))
    assert segmentation.label_map.shape == china.shape[:2]


def test_the_agreement_report_counts_the_photos_with_torchs_tokens(blip, photos, tmp_path):
    report = caption_agreement(_captioner(captioner_on_engine(blip, "openvino", tmp_path)), blip, photos)
    assert {key: report[key] for key in ("images", "same", "share", "engine")} == {
        "images": 3, "same": 3, "share": 1.0, "engine": "openvino"}
    assert set(report["caption_ms"]) == {"torch", "openvino"} and min(report["caption_ms"].values()) > 0


def test_the_photos_are_a_folders_or_its_voc_jpeg_images(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    for name in ("b.jpg", "a.PNG", "notes.txt"):
        (tmp_path / "JPEGImages" / name).write_bytes(b"")
    assert [path.name for path in photo_paths(tmp_path)] == ["a.PNG", "b.jpg"]
    assert photo_paths(tmp_path / "JPEGImages") == photo_paths(tmp_path)


@pytest.mark.slow
def test_the_bench_json_has_the_caption_token_agreement(tiny_settings, photos, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for index, photo in enumerate(photos):
        Image.fromarray(photo).save(folder / f"{index}.png")
    settings = tiny_settings.model_copy(update={"captioner": "blip", "caption_engine": "openvino"})
    config = BenchConfig(profile="tiny", device="cpu", images=1, batch=1, naive=False, caption_agreement=folder,
                         json_path=tmp_path / "bench.json")
    run_bench(config, settings)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["caption_engine"] == "openvino"
    assert saved["caption_token_agreement"]["images"] == 3 and saved["caption_token_agreement"]["share"] == 1.0
