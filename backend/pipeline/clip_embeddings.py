"""CLIP text and image embeddings, shared by candidate matching and mask labelling.

Images are padded to a square with black before resizing, never centre-cropped: the
released code let CLIP's preprocessing crop, which drops the pixels of clusters near the
edges of non-square images. Black padding matches the black of the masked-out pixels.
(``centre_square`` is that crop, for the released code's rules: a square is padded by nothing.)
Text embeddings are kept in a bounded cache, since a project's label set repeats.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from backend.pipeline.parts import ClipParts

PROMPT_TEMPLATE = "a photo of a {}."
LOGIT_SCALE = 100.0  # CLIP's trained temperature, fixed at 100 in OpenAI's weights


class TextImageEmbedder(Protocol):
    """What the pipeline needs of CLIP; tests substitute an oracle."""

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray: ...


def pad_to_square(image: np.ndarray) -> np.ndarray:
    """Centre ``image`` (H, W, 3) on a black square canvas."""
    height, width = image.shape[:2]
    side = max(height, width)
    canvas = np.zeros((side, side, 3), dtype=image.dtype)
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top : top + height, left : left + width] = image
    return canvas


def centre_square(image: np.ndarray) -> np.ndarray:
    """The central square of ``image`` (H, W, 3): what CLIP's own preprocessing (resize, centre crop) keeps."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return image[top : top + side, left : left + side]


class ClipEmbedder:
    """Unit-norm CLIP embeddings of prompts and images, in float32 numpy."""

    def __init__(self, parts: ClipParts, device: torch.device, dtype: torch.dtype, text_cache_size: int = 4096):
        self.model = parts.model
        self.tokenizer = parts.tokenizer
        self.device, self.dtype = device, dtype
        self.input_size = _input_size(parts.model)
        self.mean = torch.tensor(parts.mean, device=device, dtype=dtype).view(1, 3, 1, 1)
        self.std = torch.tensor(parts.std, device=device, dtype=dtype).view(1, 3, 1, 1)
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._text_cache_size = text_cache_size
        self._lock = threading.Lock()

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            missing = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if missing:
            tokens = self.tokenizer(list(missing)).to(self.device)
            embeddings = F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu().numpy()
            with self._lock:
                for text, embedding in zip(missing, embeddings):
                    self._text_cache[text] = embedding
                while len(self._text_cache) > self._text_cache_size:
                    self._text_cache.popitem(last=False)
        with self._lock:
            return np.stack([self._text_cache[t] for t in texts]) if texts else np.zeros((0, 0), np.float32)

    @torch.inference_mode()
    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        batch = torch.stack([self._to_tensor(image) for image in images])
        batch = (batch.to(self.dtype) - self.mean) / self.std
        return F.normalize(self.model.encode_image(batch).float(), dim=-1).cpu().numpy()

    def _to_tensor(self, image: np.ndarray) -> torch.Tensor:
        square = torch.from_numpy(pad_to_square(image)).to(self.device).permute(2, 0, 1)[None].float() / 255.0
        resized = F.interpolate(square, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False, antialias=True)
        return resized[0].clamp(0.0, 1.0)


def _input_size(model: torch.nn.Module) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def prompts_for(names: Sequence[str]) -> list[str]:
    """CLIP prompts for class names, with the template of the CLIP paper."""
    return [PROMPT_TEMPLATE.format(name) for name in names]
