"""Stage 3: visual features from one pass of Stable Diffusion's U-Net.

The image is resized to a square (``image_size``, aspect not kept, as in the released
code), scaled to [-1, 1] and encoded by the VAE; its mean latent (deterministic, where the
released code sampled it) times the VAE's scaling factor goes through the U-Net once at
timestep 0, conditioned on the empty prompt's embedding (computed once).

Which tensors are taken is a setting:

* ``attention-query`` (default, the released code): the cross-attention query
  projection (``attn2.to_q``) of every transformer block at one U-Net level. At level 2
  of SD1.5 these are the five 16x16 blocks (two in ``down_blocks[2]``, three in
  ``up_blocks[1]``), 5 x 1280 = 6400 channels.
* ``resnet`` (the paper's text): the outputs of the resnet blocks at that level.

Each tensor is resized bilinearly to ``grid`` x ``grid`` and the channels concatenated.
The forward pass stops as soon as the last wanted tensor is computed: the higher
resolution decoder blocks after it cost time and add nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from backend.models.loading import StableDiffusionParts
from backend.pipeline.sd_text import StableDiffusionText


@dataclass(frozen=True)
class FeatureSettings:
    image_size: int = 512
    kind: str = "attention-query"
    level: int = 2
    grid: int = 32


class _StopForward(Exception):
    """Raised by the last hook: the rest of the U-Net is not needed."""


class FeatureExtractor:
    """Images in, (B, C, grid, grid) float16 feature grids out."""

    def __init__(self, parts: StableDiffusionParts, settings: FeatureSettings, device: torch.device, dtype: torch.dtype):
        self.vae, self.unet = parts.vae, parts.unet
        self.settings = settings
        self.device, self.dtype = device, dtype
        self.modules = self._feature_modules()
        self.empty_prompt = self._empty_prompt_embedding(parts)

    def _feature_modules(self) -> list[torch.nn.Module]:
        """The modules whose outputs are the features, in the order the U-Net runs them."""
        levels = len(self.unet.down_blocks)
        if not 0 <= self.settings.level < levels:
            raise ValueError(f"FREESEG_FEATURE_LEVEL must be between 0 and {levels - 1} for this U-Net")
        blocks = (self.unet.down_blocks[self.settings.level], self.unet.up_blocks[levels - 1 - self.settings.level])
        if self.settings.kind == "resnet":
            modules = [resnet for block in blocks for resnet in block.resnets]
        else:
            modules = [
                transformer.attn2.to_q
                for block in blocks
                for attention in getattr(block, "attentions", [])
                for transformer in attention.transformer_blocks
            ]
        if not modules:
            raise ValueError(f"the U-Net has no {self.settings.kind} tensors at level {self.settings.level}")
        return modules

    def _empty_prompt_embedding(self, parts: StableDiffusionParts) -> torch.Tensor:
        return StableDiffusionText(parts, self.device).hidden_states([""]).to(self.dtype)

    def _to_batch(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        size = self.settings.image_size
        resized = [np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC)) for image in images]
        batch = torch.from_numpy(np.stack(resized)).to(self.device).permute(0, 3, 1, 2)
        return (batch.to(self.dtype) / 127.5 - 1.0).contiguous()

    @torch.inference_mode()
    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        pixels = self._to_batch(images)
        latents = self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor
        captured: list[torch.Tensor] = []

        def capture(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
            captured.append(_as_grid(output))
            if len(captured) == len(self.modules):
                raise _StopForward

        handles = [module.register_forward_hook(capture) for module in self.modules]
        try:
            timestep = torch.zeros(len(images), device=self.device, dtype=torch.long)
            context = self.empty_prompt.expand(len(images), -1, -1)
            self.unet(latents, timestep, encoder_hidden_states=context)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        grid = self.settings.grid
        resized = [F.interpolate(t.float(), size=(grid, grid), mode="bilinear", align_corners=False) for t in captured]
        return torch.cat(resized, dim=1).half().cpu().numpy()


def _as_grid(output: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) from a conv output or from a (B, h*w, C) token sequence of a square map."""
    if output.ndim == 4:
        return output
    batch, tokens, channels = output.shape
    side = math.isqrt(tokens)
    return output.transpose(1, 2).reshape(batch, channels, side, side)
