"""The captioner registry: each kind is one entry, and every place that used to branch on the kind reads it."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import get_args

import numpy as np
import pytest
import torch

from backend.models.assembly import resolve_captioner
from backend.models.captioners import CAPTIONERS, captioner_source
from backend.models.download import repo_requests
from backend.models.loading import load_captioner
from backend.models.random_full import build_captioner
from backend.models.tiny import build_tiny_models
from backend.pipeline.caption import CaptionGeneration, Captioner
from backend.settings import CaptionerChoice, CaptionerKind, Settings

CPU = {"device": torch.device("cpu"), "dtype": torch.float32}


def test_settings_offer_exactly_the_registry_kinds():
    assert set(get_args(CaptionerKind)) == set(CAPTIONERS)
    assert set(get_args(CaptionerChoice)) == {"auto", *CAPTIONERS}
    assert all(kind == spec.kind for kind, spec in CAPTIONERS.items())
    assert Settings(fidelity="release").captioner in CAPTIONERS  # the release's BLIP base is an entry too


@pytest.mark.parametrize("kind", sorted(CAPTIONERS))
def test_each_kind_downloads_and_defaults_to_its_entry(kind):
    settings = Settings(captioner=kind)
    (request,) = [r for r in repo_requests(settings, half=False, captioner_half=False, captioner=kind)
                  if r.setting == "FREESEG_CAPTIONER_MODEL"]
    assert (request.repo_id, request.components) == (CAPTIONERS[kind].hub_id, CAPTIONERS[kind].components)
    assert captioner_source(settings, kind) == CAPTIONERS[kind].hub_id
    assert captioner_source(Settings(captioner=kind, captioner_model="/models/mine"), kind) == "/models/mine"
    assert resolve_captioner(settings) == kind  # a kind named is taken as given, on any device


def _gpu_of(monkeypatch: pytest.MonkeyPatch, gigabytes: float) -> None:
    """This machine seen with one CUDA device of this much memory."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(total_memory=int(gigabytes * 1e9)))


@pytest.mark.parametrize("device, gigabytes, dtype, kind", [
    ("cpu", None, "auto", "blip"),  # 70 s and 20 GB of RAM per caption on a CPU
    ("cuda", 16, "auto", "blip2"),  # a T4: float16 BLIP-2 is 7.5 GB
    ("cuda", 80, "auto", "blip2"),
    ("cuda", 12, "auto", "blip"),
    ("cuda", 24, "float32", "blip"),  # 15 GB of float32 weights want 30 GB
    ("cuda", 40, "float32", "blip2"),
])
def test_auto_is_blip2_on_a_cuda_device_it_fits_and_blip_elsewhere(monkeypatch, device, gigabytes, dtype, kind):
    if gigabytes is not None:
        _gpu_of(monkeypatch, gigabytes)
    assert resolve_captioner(Settings(device=device, dtype=dtype)) == kind


def test_auto_follows_the_captioners_own_device_and_release_keeps_blip(monkeypatch):
    _gpu_of(monkeypatch, 80)
    assert resolve_captioner(Settings(device="cuda", captioner_device="cpu")) == "blip"
    assert resolve_captioner(Settings(device="cuda", fidelity="release")) == "blip"
    assert Settings(fidelity="release", captioner="auto").captioner == "blip"


def test_the_fingerprint_and_download_name_the_resolved_kind(monkeypatch):
    from backend.models.identity import models_fingerprint

    auto, blip = Settings(device="cpu"), Settings(device="cpu", captioner="blip")
    assert models_fingerprint(auto, torch.float32) == models_fingerprint(blip, torch.float32)
    assert models_fingerprint(auto, torch.float32) != models_fingerprint(
        Settings(device="cpu", captioner="blip2"), torch.float32)
    _gpu_of(monkeypatch, 80)
    assert models_fingerprint(Settings(device="cuda"), torch.float16) == models_fingerprint(
        Settings(device="cuda", captioner="blip2"), torch.float16)


def test_a_new_captioner_is_one_entry(tmp_path, monkeypatch):
    """A kind added as one entry is built by both offline profiles, loaded and asked as its entry says."""
    blip = CAPTIONERS["blip"]
    dog = dataclasses.replace(blip, kind="blip-dog", hub_id="example/blip-dog",
                              generation=CaptionGeneration(prompt="a dog", min_length=10))
    monkeypatch.setitem(CAPTIONERS, dog.kind, dog)
    build_tiny_models(tmp_path)
    parts = load_captioner(dog.kind, str(tmp_path / dog.kind), **CPU)
    assert type(parts.model) is dog.model_class and parts.kind == dog.kind
    images = [np.random.default_rng(seed).integers(0, 256, (80, 96, 3), dtype=np.uint8) for seed in range(2)]
    captions = Captioner(parts, dog.generation, **CPU)(images)
    assert len(captions) == 2 and all(isinstance(caption, str) and caption for caption in captions)
    assert captions != Captioner(parts, blip.generation, **CPU)(images)  # its own prompt asked the model
    random_full = build_captioner(dog.kind, torch.device("meta"), torch.float16)
    assert type(random_full.model) is dog.model_class and random_full.kind == dog.kind
