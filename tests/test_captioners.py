"""The captioner registry: each kind is one entry, and every place that used to branch on the kind reads it."""

from __future__ import annotations

import dataclasses
from typing import get_args

import numpy as np
import pytest
import torch

from backend.models.captioners import CAPTIONERS, captioner_source
from backend.models.download import repo_requests
from backend.models.loading import load_captioner
from backend.models.random_full import build_captioner
from backend.models.tiny import build_tiny_models
from backend.pipeline.caption import CaptionGeneration, Captioner
from backend.settings import CaptionerKind, Settings

CPU = {"device": torch.device("cpu"), "dtype": torch.float32}


def test_settings_offer_exactly_the_registry_kinds():
    assert set(get_args(CaptionerKind)) == set(CAPTIONERS)
    assert all(kind == spec.kind for kind, spec in CAPTIONERS.items())
    assert Settings(fidelity="release").captioner in CAPTIONERS  # the release's BLIP base is an entry too


@pytest.mark.parametrize("kind", sorted(CAPTIONERS))
def test_each_kind_downloads_and_defaults_to_its_entry(kind):
    settings = Settings(captioner=kind)
    (request,) = [r for r in repo_requests(settings, half=False, captioner_half=False)
                  if r.setting == "FREESEG_CAPTIONER_MODEL"]
    assert (request.repo_id, request.components) == (CAPTIONERS[kind].hub_id, CAPTIONERS[kind].components)
    assert captioner_source(settings) == CAPTIONERS[kind].hub_id
    assert captioner_source(Settings(captioner=kind, captioner_model="/models/mine")) == "/models/mine"


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
