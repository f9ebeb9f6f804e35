"""The ``tiny`` profile: small, seeded, randomly initialised models of the real classes.

They exist so that tests and smoke runs exercise the whole product (loading code
included) on a machine with no model hub. Each model is built once from a fixed seed,
written with ``save_pretrained`` in the layout of its pretrained counterpart, and then
loaded back by :mod:`backend.models.loading` exactly like downloaded weights. Their
output is meaningless as a segmentation; every result made with them says so.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import open_clip
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from backend.models.captioners import CAPTIONERS
from backend.models.tokenizers import write_clip_tokenizer

TINY_FORMAT = "tiny-v2"  # bump when the architectures below change (v2: TAESD)
TINY_TAESD = "taesd"  # the folder of the small TAESD, in madebyollin/taesd's layout
SEED = 20240101
CLIP_TOKEN_IDS = {"bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}


def tiny_model_folder(model_dir: Path) -> Path:
    """Where the tiny models live; built on first use."""
    folder = model_dir / TINY_FORMAT
    if not (folder / "complete").exists():
        _build_atomically(folder)
    return folder


def _build_atomically(folder: Path) -> None:
    """Build in a temporary folder and rename, so concurrent processes never see half a model."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=folder.parent))
    try:
        build_tiny_models(staging)
        (staging / "complete").write_text("ok\n")
        os.rename(staging, folder)
    except OSError:
        if not (folder / "complete").exists():  # not another process's finished copy
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_tiny_models(folder: Path) -> None:
    """Write every tiny model under ``folder``: stable-diffusion/, clip/, each captioner's kind (blip/, ...), taesd/.

    One seeded stream runs through them in this order: a new model goes last, so the others stay as they were.
    """
    torch.manual_seed(SEED)
    _save_stable_diffusion(folder / "stable-diffusion")
    _save_clip(folder / "clip")
    for captioner in CAPTIONERS.values():
        captioner.save_tiny(folder / captioner.kind)
    _save_taesd(folder / TINY_TAESD)


def _save_stable_diffusion(folder: Path) -> None:
    """SD1.x's layout at a tiny width: four levels, attention at the first three."""
    unet = UNet2DConditionModel(
        sample_size=64,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            **CLIP_TOKEN_IDS,
        )
    )
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    write_clip_tokenizer(folder / "tokenizer")


def _save_clip(folder: Path) -> None:
    """An open_clip ViT in the ``local-dir:`` layout (config JSON plus safetensors)."""
    model_cfg = {
        "embed_dim": 64,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    model = open_clip.CLIP(**{k: v for k, v in model_cfg.items()})
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {"mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))


def _save_taesd(folder: Path) -> None:
    """TAESD's layout (an encoder and decoder of four levels, latents at 1/8 of the image) at a tiny width."""
    AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                    num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1)).save_pretrained(folder)
