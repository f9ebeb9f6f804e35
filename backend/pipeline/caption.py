"""Stage 1: a caption that names what is in the image.

BLIP-2 (``Salesforce/blip2-opt-2.7b``) is the paper's captioner and the default; BLIP base
(``Salesforce/blip-image-captioning-base``) is the lighter option of the released code,
prompted with "a picture of " (stripped from the output). Both use beam search with
3 beams as the released code did, on a batch of images at once. The model is loaded once
per process (the released code reloaded it for every image).

How long a caption may be is a ``CaptionLength``: ours lets BLIP write 30 tokens after its
prompt; the released code's (LAVIS base_coco) counted the prompt in its 30 (and in its minimum of 10).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from backend.pipeline.parts import CaptionerParts

NUM_BEAMS = 3
MAX_NEW_TOKENS = 30


@dataclass(frozen=True)
class CaptionGeneration:
    """How a captioner is asked: from a text ``prompt`` (BLIP's "[BOS] prompt [SEP]", cut from the caption) with
    ``min_length`` counting the prompt, as in the released code; or, with no prompt, from the image alone (BLIP-2)."""

    prompt: str | None = None
    min_length: int | None = None


@dataclass(frozen=True)
class CaptionLength:
    """How many tokens BLIP may write: ``max_tokens``, after its prompt or, ``prompt_counts``, including it."""

    max_tokens: int = MAX_NEW_TOKENS
    prompt_counts: bool = False

    def blip_max_length(self, prompt_tokens: int) -> int:
        """generate()'s ``max_length`` (which counts the prompt) for a prompt of ``prompt_tokens``."""
        return self.max_tokens if self.prompt_counts else prompt_tokens + self.max_tokens


OURS = CaptionLength()
RELEASE = CaptionLength(prompt_counts=True)  # LAVIS blip_caption: max_length=30 over prompt and caption


class Captioner:
    """Images in, one caption string per image out."""

    def __init__(self, parts: CaptionerParts, generation: CaptionGeneration, device: torch.device,
                 dtype: torch.dtype, length: CaptionLength = OURS):
        self.kind = parts.kind
        self.generation = generation
        self.model = parts.model
        self.tokenizer = parts.processor.tokenizer
        self.image_processor = parts.processor.image_processor
        self.device, self.dtype = device, dtype
        self.length = length
        # Its own CUDA stream, so that it runs beside the U-Net when called from another thread.
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, images: Sequence[np.ndarray]) -> list[str]:
        return [text.strip() for text in self.tokenizer.batch_decode(self.token_ids(images), skip_special_tokens=True)]

    @torch.inference_mode()
    def token_ids(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """The captions' token ids, one row per image (what engines are compared on)."""
        with torch.cuda.stream(self._stream) if self._stream is not None else nullcontext():
            return self._generate(images)

    def _generate(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        pixels = self.image_processor([Image.fromarray(image) for image in images], return_tensors="pt").pixel_values
        pixels = pixels.to(self.device, self.dtype)
        if self.generation.prompt is not None:
            prompt = self._prompt_ids(self.generation.prompt, len(images))
            output = self.model.generate(
                pixel_values=pixels, input_ids=prompt, num_beams=NUM_BEAMS,
                min_length=self.generation.min_length, max_length=self.length.blip_max_length(prompt.shape[1]),
            )
            output = output[:, prompt.shape[1] - 1 :]  # generate() drops the prompt's final [SEP]
        else:
            output = self.model.generate(pixel_values=pixels, num_beams=NUM_BEAMS, max_new_tokens=MAX_NEW_TOKENS)
        return output

    def _prompt_ids(self, text: str, batch: int) -> torch.Tensor:
        """[BOS] prompt [SEP], the shape BLIP's generate() expects from its BERT tokenizer."""
        config = self.model.config.text_config
        words = self.tokenizer(text, add_special_tokens=False).input_ids
        row = [config.bos_token_id, *words, config.sep_token_id]
        return torch.tensor([row] * batch, device=self.device)
