"""Stage 3: visual features from one pass of Stable Diffusion's U-Net.

The image is resized to a square (``image_size``, aspect not kept, as in the released
code), scaled to [-1, 1] and encoded by the VAE; its mean latent (deterministic, where the
released code sampled it) times the VAE's scaling factor goes through the U-Net once at
timestep 0, conditioned on the empty prompt's embedding (both computed once).

With FREESEG_ENCODER=taesd, TAESD (diffusers' ``AutoencoderTiny``) encodes the image instead: its
encoder's output is distilled to stand in for the VAE's scaled latents (its config's scaling factor is
1.0, and diffusers' pipelines multiply by it just the same), at a small fraction of the VAE's cost.

Which tensors are taken is a setting:

* ``attention-query`` (default, the released code): the cross-attention query
  projection (``attn2.to_q``) of every transformer block at one U-Net level. At level 2
  of SD1.5 these are the five 16x16 blocks (two in ``down_blocks[2]``, three in
  ``up_blocks[1]``), 5 x 1280 = 6400 channels.
* ``resnet`` (the paper's text): the outputs of the resnet blocks at that level.

Each tensor is resized bilinearly to ``grid`` x ``grid`` and the channels concatenated.

:class:`FeatureNetwork` is that computation as one module, pixels in, grids out, and only
what it needs: the VAE's (or TAESD's) encoder, not its decoder, and the U-Net up to the up block of the
feature level (not the higher-resolution decoder blocks after it, nor that block's
upsampler). It traces as one graph, so an engine (``backend.models.engines``) can compile it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image

from backend.pipeline.parts import StableDiffusionParts
from backend.pipeline.sd_text import StableDiffusionText

FeatureRunner = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, S, S) pixels in [-1, 1] -> (B, C, G, G) grids


@dataclass(frozen=True)
class FeatureSettings:
    image_size: int = 512
    kind: str = "attention-query"
    level: int = 2
    grid: int = 32


class FeatureNetwork(torch.nn.Module):
    """Pixels in [-1, 1], (B, 3, S, S), to the (B, C, grid, grid) feature grids, in the models' dtype."""

    def __init__(self, parts: StableDiffusionParts, settings: FeatureSettings, text: StableDiffusionText):
        super().__init__()
        vae, unet = parts.vae, parts.unet
        _require_plain_unet(unet)
        self.settings = settings
        self.encoder = vae.encoder
        # the VAE's encoder gives the latent distribution's moments; TAESD's the latents themselves
        self.quant_conv = vae.quant_conv if isinstance(vae, AutoencoderKL) else torch.nn.Identity()
        self.latent_channels, self.scaling_factor = vae.config.latent_channels, vae.config.scaling_factor
        self.conv_in, self.down_blocks, self.mid_block = unet.conv_in, unet.down_blocks, unet.mid_block
        self.up_blocks = _up_blocks_to_level(unet, settings.level)
        self.taps = _tapped_modules(self.down_blocks[settings.level], self.up_blocks[-1], settings)
        device, dtype = text.device, unet.dtype
        self.register_buffer("time_embedding", _timestep_zero_embedding(unet, device, dtype), persistent=False)
        empty_prompt = text.hidden_states([""]).to(dtype).clone()  # a clone outside inference mode: traceable
        self.register_buffer("context", empty_prompt, persistent=False)
        self._tapped: list[torch.Tensor] = []
        for module in self.taps:
            module.register_forward_hook(lambda module, inputs, output: self._tapped.append(output))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self._tapped.clear()
        moments = self.quant_conv(self.encoder(pixels))
        latents = moments[:, : self.latent_channels] * self.scaling_factor  # the VAE's distribution's mean
        batch = pixels.shape[0]
        time, context = self.time_embedding.expand(batch, -1), self.context.expand(batch, -1, -1)

        hidden = self.conv_in(latents)
        skips = [hidden]
        for block in self.down_blocks:
            hidden, block_skips = block(hidden, time, **_cross_attention(block, context))
            skips += block_skips
        hidden = self.mid_block(hidden, time, **_cross_attention(self.mid_block, context))
        for block in self.up_blocks:
            count = len(block.resnets)
            hidden = block(hidden, tuple(skips[-count:]), time, **_cross_attention(block, context))
            del skips[-count:]

        grid = self.settings.grid
        grids = [F.interpolate(_as_grid(t).float(), size=(grid, grid), mode="bilinear", align_corners=False)
                 for t in self._tapped]
        return torch.cat(grids, dim=1)


class FeatureExtractor:
    """Images in, (B, C, grid, grid) float16 feature grids out, through an engine's runner of ``network``."""

    def __init__(self, network: FeatureNetwork, runner: FeatureRunner | None = None, engine: str = "torch"):
        self.network = network
        self.runner = runner or network
        self.engine = engine
        self.settings = network.settings
        self.device, self.dtype = network.context.device, network.context.dtype

    def pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """The network's input: each image resized to the square ``image_size``, scaled to [-1, 1]."""
        size = self.settings.image_size
        resized = [np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC)) for image in images]
        batch = torch.from_numpy(np.stack(resized)).to(self.device).permute(0, 3, 1, 2)
        return (batch.to(self.dtype) / 127.5 - 1.0).contiguous()

    @torch.inference_mode()
    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return self.runner(self.pixels(images)).half().cpu().numpy()


def _require_plain_unet(unet: UNet2DConditionModel) -> None:
    """The network conditions on time and text only, as SD1.x does; other U-Nets need their extra inputs."""
    config = unet.config
    extras = {name: config.get(name) for name in ("class_embed_type", "addition_embed_type", "time_cond_proj_dim")}
    if any(value is not None for value in extras.values()):
        raise ValueError(f"this U-Net needs inputs the feature network does not give it: {extras}; "
                         "FREESEG_SD_MODEL must name a Stable Diffusion 1.x model")


def _up_blocks_to_level(unet: UNet2DConditionModel, level: int) -> torch.nn.ModuleList:
    """The up blocks through the one that mirrors down block ``level``; that last one without its upsampler."""
    levels = len(unet.down_blocks)
    if not 0 <= level < levels:
        raise ValueError(f"FREESEG_FEATURE_LEVEL must be between 0 and {levels - 1} for this U-Net")
    blocks = list(unet.up_blocks[: levels - level])
    last = copy.copy(blocks[-1])
    last._modules = dict(last._modules)  # a module of its own: the U-Net's block keeps its upsampler
    last.upsamplers = None
    return torch.nn.ModuleList(blocks[:-1] + [last])


def _tapped_modules(down: torch.nn.Module, up: torch.nn.Module, settings: FeatureSettings) -> list[torch.nn.Module]:
    """The modules whose outputs are the features, in the order the U-Net runs them."""
    blocks = (down, up)
    if settings.kind == "resnet":
        modules = [resnet for block in blocks for resnet in block.resnets]
    else:
        modules = [
            transformer.attn2.to_q
            for block in blocks
            for attention in getattr(block, "attentions", None) or []
            for transformer in attention.transformer_blocks
        ]
    if not modules:
        raise ValueError(f"the U-Net has no {settings.kind} tensors at level {settings.level}")
    return modules


def _cross_attention(block: torch.nn.Module, context: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"encoder_hidden_states": context} if getattr(block, "has_cross_attention", False) else {}


@torch.no_grad()
def _timestep_zero_embedding(unet: UNet2DConditionModel, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The U-Net's embedding of timestep 0, (1, D): the same for every image."""
    sample = torch.zeros(1, device=device, dtype=dtype)
    timestep = torch.zeros(1, device=device, dtype=torch.long)
    return unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep)).clone()


def _as_grid(output: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) from a conv output or from a (B, h*w, C) token sequence of a square map."""
    if output.ndim == 4:
        return output
    side = math.isqrt(output.shape[1])
    return output.transpose(1, 2).unflatten(2, (side, side))
