"""The ``random-full`` profile: the real architectures at full size, with random weights.

Speed does not depend on the weights' values, so this profile measures the real cost of
every stage on a machine that cannot download the pretrained weights. It is built in
memory on the target device (saving 15 GB of random numbers would teach nothing).
Its masks are noise and every result made with it says so.
"""

from __future__ import annotations

import open_clip
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from backend.models.captioners import CAPTIONERS
from backend.models.tokenizers import write_clip_tokenizer
from backend.pipeline.parts import CaptionerParts, ClipParts, StableDiffusionParts
from backend.settings import EncoderKind

SEED = 20240102


def _prepare(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """In eval mode on ``device`` in ``dtype``, by ``nn.Module.to``: diffusers' own ``to`` warns on every dtype
    cast that some modules should stay float32, even when (as in these models) none should."""
    return torch.nn.Module.to(module, device=device, dtype=dtype).eval().requires_grad_(False)


def build_stable_diffusion(tokenizer_folder, device: torch.device, dtype: torch.dtype,
                           encoder: EncoderKind = "vae") -> StableDiffusionParts:
    """SD1.5's U-Net (859.5 M parameters), VAE and text encoder, randomly initialised; with ``encoder="taesd"``,
    TAESD (``madebyollin/taesd``'s configuration, 2.4 M parameters) in the VAE's place, and no VAE."""
    torch.manual_seed(SEED)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            sample_size=512,
        ) if encoder == "vae" else AutoencoderTiny()
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
            )
        )
    write_clip_tokenizer(tokenizer_folder)
    return StableDiffusionParts(
        vae=_prepare(vae, device, dtype),
        unet=_prepare(unet, device, dtype),
        text_encoder=_prepare(text_encoder, device, dtype),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_folder),
    )


def build_clip(device: torch.device, dtype: torch.dtype) -> ClipParts:
    """open_clip's ViT-B-32 architecture with no pretrained weights."""
    torch.manual_seed(SEED)
    model = open_clip.create_model("ViT-B-32", pretrained=None, device=device, force_quick_gelu=True)
    return ClipParts(
        model=_prepare(model, device, dtype),
        tokenizer=open_clip.get_tokenizer("ViT-B-32"),
        mean=open_clip.OPENAI_DATASET_MEAN,
        std=open_clip.OPENAI_DATASET_STD,
    )


def build_captioner(kind: str, device: torch.device, dtype: torch.dtype) -> CaptionerParts:
    """The captioner of this kind at full size (BLIP base 224 M, BLIP-2 OPT-2.7b 3.74 B), randomly initialised."""
    torch.manual_seed(SEED)
    with torch.device(device):
        model, processor = CAPTIONERS[kind].build_random()
    return CaptionerParts(kind=kind, model=_prepare(model, device, dtype), processor=processor)
