"""Stable Diffusion's own text encoder, as the released code used it to match nouns to classes.

It is the CLIP ViT-L/14 text tower loaded with the U-Net (no second model). A text is padded
to the encoder's 77 positions, encoded, and its last hidden states are averaged over all 77
positions, padding included: that is the released code's pooling, kept as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from backend.pipeline.parts import StableDiffusionParts


class TextPooler(Protocol):
    """Texts in, one pooled float vector per text out; tests substitute a table."""

    def __call__(self, texts: Sequence[str]) -> np.ndarray: ...


class StableDiffusionText:
    """The text encoder of a Stable Diffusion pipeline: sequences for the U-Net, means for matching."""

    def __init__(self, parts: StableDiffusionParts, device: torch.device):
        self.encoder, self.tokenizer, self.device = parts.text_encoder, parts.tokenizer, device
        self.length = int(parts.text_encoder.config.max_position_embeddings)

    @torch.inference_mode()
    def hidden_states(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, 77, C) last hidden states of ``texts``, padded (and cut) to the encoder's length."""
        tokens = self.tokenizer(list(texts), padding="max_length", max_length=self.length, truncation=True,
                                return_tensors="pt").input_ids
        return self.encoder(tokens.to(self.device))[0]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """(N, C) float64: each text's hidden states averaged over all 77 positions."""
        return self.hidden_states(texts).double().mean(dim=1).cpu().numpy()
