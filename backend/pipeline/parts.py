"""The loaded models each stage runs, as the pipeline takes them: ``backend.models`` builds them (pretrained,
tiny or random-full) and hands them down; the pipeline never loads a model itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer, PreTrainedModel, ProcessorMixin


@dataclass
class StableDiffusionParts:
    vae: AutoencoderKL | AutoencoderTiny  # TAESD with FREESEG_ENCODER=taesd, in the VAE's place as in diffusers' pipelines
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
