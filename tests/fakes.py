"""Small fakes of model outputs, for tests of the pipeline's mechanics."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from backend.pipeline.clip_embeddings import PROMPT_TEMPLATE

PREFIX, SUFFIX = PROMPT_TEMPLATE.split("{}")


def prompt_word(prompt: str) -> str:
    assert prompt.startswith(PREFIX) and prompt.endswith(SUFFIX), prompt
    return prompt[len(PREFIX) : len(prompt) - len(SUFFIX)]


class WordVectorEmbedder:
    """Text embeddings from a word -> vector table; unknown words get an orthogonal axis."""

    def __init__(self, table: dict[str, Sequence[float]], dimensions: int):
        self.table = {word: np.asarray(v, dtype=np.float32) for word, v in table.items()}
        self.dimensions = dimensions
        self.calls: list[list[str]] = []

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        rows = []
        for text in texts:
            vector = self.table.get(prompt_word(text))
            if vector is None:
                vector = np.zeros(self.dimensions, dtype=np.float32)
                vector[-1] = 1.0
            rows.append(vector / np.linalg.norm(vector))
        return np.stack(rows)

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        raise AssertionError("not expected in this test")
