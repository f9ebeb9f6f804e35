"""The models' identity: what an encoding depends on, and the ``model_version`` predictions carry.

The fingerprint hashes everything an Encoding depends on (models, precision, feature settings,
format); the feature cache keys encodings by it and the project memory is kept per fingerprint,
so nothing made by other models is ever served. ``model_version`` is what Label Studio stores
with each prediction; the offline profiles say in it that their weights are random.
"""

from __future__ import annotations

import hashlib
import json

import torch

from backend import __version__
from backend.models.assembly import resolve_captioner, resolve_device
from backend.models.captioners import captioner_source
from backend.pipeline.encoding import FORMAT_VERSION
from backend.pipeline.features import FeatureSettings
from backend.settings import Settings


def feature_settings(settings: Settings) -> FeatureSettings:
    return FeatureSettings(image_size=settings.image_size, kind=settings.features,
                           level=settings.feature_level, grid=settings.feature_grid)


def models_fingerprint(settings: Settings, dtype: torch.dtype) -> str:
    """A hash of everything an Encoding depends on: models (the captioner as ``auto`` resolved), feature settings,
    precision, format."""
    captioner = resolve_captioner(settings)
    described = {
        "format": FORMAT_VERSION,
        "profile": settings.models,
        "dtype": str(dtype),
        "working_max_side": settings.working_max_side,  # images above it are encoded from a shrunk copy
        "features": feature_settings(settings).__dict__,
        "captioner": [captioner, settings.captioner_device],
    }
    if settings.fidelity != "default":  # the release's captions are shorter; default fingerprints stay as they were
        described["fidelity"] = settings.fidelity
    if settings.encoder != "vae":  # the VAE's fingerprints stay as they were
        described["encoder"] = settings.encoder
    if settings.models == "pretrained":
        described.update(sd=settings.sd_model, clip=[settings.clip_model, settings.clip_pretrained],
                         captioner_model=captioner_source(settings, captioner))
        if settings.encoder == "taesd":
            described["taesd"] = settings.taesd_model
        if settings.clip_checkpoint:
            described["clip_checkpoint"] = str(settings.clip_checkpoint)
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def settings_fingerprint(settings: Settings) -> str:
    """``models_fingerprint`` for the dtype these settings resolve to on this machine."""
    return models_fingerprint(settings, resolve_device(settings.device, settings.dtype)[1])


def model_version(settings: Settings) -> str:
    """The ``model_version`` of every prediction; a faster encoder than the paper's VAE and the non-pretrained
    profiles say so in it."""
    version = f"freesegdiff-{__version__}-{settings_fingerprint(settings)[:8]}"
    if settings.encoder != "vae":
        version = f"{version}-{settings.encoder}"
    return version if settings.models == "pretrained" else f"{version}-{settings.models}-random-weights"
