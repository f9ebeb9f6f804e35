"""Model loading: pretrained weights by hub id or folder, and the two offline profiles."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING
from functools import lru_cache

import torch
from huggingface_hub import HfApi, constants

from backend.models import download, random_full
from backend.models.captioners import auto_captioner, captioner_source
from backend.models.loading import ModelUnavailableError, load_captioner, load_clip, load_spacy, load_stable_diffusion
from backend.models.tiny import TINY_TAESD, tiny_model_folder
from backend.pipeline.parts import CaptionerParts, ClipParts, StableDiffusionParts
from backend.settings import CaptionerKind, Settings

if TYPE_CHECKING:  # spaCy is needed only for FREESEG_NOUNS=spacy
    from spacy.language import Language

log = logging.getLogger(__name__)

__all__ = ["ModelParts", "ModelUnavailableError", "cpu_has_native_bfloat16", "download_models",
           "load_captioner_parts", "load_model_parts", "resolve_captioner", "resolve_device"]


@dataclass
class ModelParts:
    """Every model the pipeline uses, loaded once per process, on one device."""

    stable_diffusion: StableDiffusionParts
    clip: ClipParts
    captioner: CaptionerParts
    nlp: Language | None  # None with FREESEG_NOUNS=words
    placement: Placement


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(choice: str, dtype_choice: str = "auto") -> tuple[torch.device, torch.dtype]:
    """The device (CUDA when asked for or present with ``auto``, else the CPU) and the models' dtype.

    ``FREESEG_DTYPE=auto`` is float16 on CUDA, bfloat16 on a CPU that computes it natively, and
    float32 elsewhere; any other value is taken as given.
    """
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("FREESEG_DEVICE=cuda but PyTorch sees no CUDA device")
        device = torch.device("cuda")
    else:
        device = torch.device("cpu")
    if dtype_choice != "auto":
        return device, _DTYPES[dtype_choice]
    if device.type == "cuda":
        return device, torch.float16
    return device, torch.bfloat16 if cpu_has_native_bfloat16() else torch.float32


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX), as PyTorch's CPU checks report it.

    Without them oneDNN emulates bfloat16, which is slower than float32.
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


@dataclass(frozen=True)
class Placement:
    """Where and in which precision the models run: the captioner may run elsewhere."""

    device: torch.device
    dtype: torch.dtype
    captioner_device: torch.device
    captioner_dtype: torch.dtype


def resolve_placement(settings: Settings) -> Placement:
    """FREESEG_DEVICE and FREESEG_CAPTIONER_DEVICE, resolved by ``resolve_device``."""
    device, dtype = resolve_device(settings.device, settings.dtype)
    captioner_device, captioner_dtype = (device, dtype) if settings.captioner_device == "auto" else resolve_device(
        settings.captioner_device, settings.dtype
    )
    return Placement(device, dtype, captioner_device, captioner_dtype)


def resolve_captioner(settings: Settings) -> CaptionerKind:
    """FREESEG_CAPTIONER, with ``auto`` resolved for the captioner's device and dtype (``auto_captioner``): what
    is loaded, downloaded and named in the fingerprint."""
    if settings.captioner != "auto":
        return settings.captioner
    placement = resolve_placement(settings)
    return auto_captioner(placement.captioner_device, placement.captioner_dtype)


def is_half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def download_models(settings: Settings, echo: download.Echo = print) -> int:
    """Fetch the files the pretrained models load (the fp16 variants when they run in half
    precision) into the Hugging Face cache; the bytes fetched (0 when all were there)."""
    placement = resolve_placement(settings)
    requests = download.repo_requests(settings, is_half(placement.dtype), is_half(placement.captioner_dtype),
                                      resolve_captioner(settings))
    return download.fetch(download.plan(requests, HfApi()), echo)


@lru_cache(maxsize=2)
def ensure_downloaded(settings: Settings) -> None:
    """``download_models`` once per process and settings (the server runs it before loading)."""
    download_models(settings, echo=lambda line: log.info("%s", line))


def load_model_parts(settings: Settings) -> ModelParts:
    """Load (or, for the offline profiles, build) the models that ``settings`` names.

    With FREESEG_ALLOW_DOWNLOADS=true (and HF_HUB_OFFLINE unset) the pretrained files
    missing from the cache are fetched first; loading itself never asks the hub.
    """
    placement = resolve_placement(settings)
    device, dtype = placement.device, placement.dtype
    nlp = load_spacy(settings.spacy_model) if settings.nouns == "spacy" else None
    if settings.models == "random-full":
        tokenizer_folder = settings.model_dir / "random-full-clip-tokenizer"
        return ModelParts(
            stable_diffusion=random_full.build_stable_diffusion(tokenizer_folder, device, dtype, settings.encoder),
            clip=random_full.build_clip(device, dtype),
            captioner=load_captioner_parts(settings),
            nlp=nlp, placement=placement,
        )
    if settings.models == "tiny":
        folder = tiny_model_folder(settings.model_dir)
        sd_source, clip_name, clip_weights = str(folder / "stable-diffusion"), str(folder / "clip"), ""
        taesd_location, checkpoint = str(folder / TINY_TAESD), None
    else:
        if downloads_wanted(settings):
            ensure_downloaded(settings)
        sd_source, clip_name, clip_weights = settings.sd_model, settings.clip_model, settings.clip_pretrained
        checkpoint, taesd_location = settings.clip_checkpoint, settings.taesd_model
    taesd = taesd_location if settings.encoder == "taesd" else None
    return ModelParts(
        stable_diffusion=load_stable_diffusion(sd_source, device=device, dtype=dtype, taesd=taesd),
        clip=load_clip(clip_name, clip_weights, checkpoint, device=device, dtype=dtype),
        captioner=load_captioner_parts(settings),
        nlp=nlp, placement=placement,
    )


def load_captioner_parts(settings: Settings) -> CaptionerParts:
    """The captioner ``settings`` name, alone, on torch (``load_model_parts`` loads it with the rest; the bench's
    caption agreement loads a torch copy to compare an engine's tokens with). Its files are those the whole
    load fetches first."""
    placement = resolve_placement(settings)
    device, dtype = placement.captioner_device, placement.captioner_dtype
    captioner = resolve_captioner(settings)
    if settings.models == "random-full":
        return random_full.build_captioner(captioner, device, dtype)
    if settings.models == "tiny":
        location = str(tiny_model_folder(settings.model_dir) / captioner)
    else:
        location = captioner_source(settings, captioner)
    return load_captioner(captioner, location, device=device, dtype=dtype)


def downloads_wanted(settings: Settings) -> bool:
    """FREESEG_ALLOW_DOWNLOADS=true for the pretrained profile, unless HF_HUB_OFFLINE=1 forbids asking."""
    return settings.allow_downloads and settings.models == "pretrained" and not constants.is_offline_mode()
