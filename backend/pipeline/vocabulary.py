"""The closed vocabulary: the labels of a project, each with optional synonyms."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from backend.pipeline.clip_embeddings import TextImageEmbedder, prompts_for


@dataclass(frozen=True)
class Label:
    """A label as the project names it, and other words that mean it (``predicted_values``)."""

    name: str
    synonyms: tuple[str, ...] = ()

    @property
    def words(self) -> tuple[str, ...]:
        """The name and synonyms, lower-cased, for exact matching against caption nouns."""
        return tuple(dict.fromkeys(w.strip().lower() for w in (self.name, *self.synonyms) if w.strip()))


def labels_from_names(names: Sequence[str]) -> list[Label]:
    """Labels without synonyms, from a list of names (the command line's ``--labels``)."""
    return [Label(name.strip()) for name in names if name.strip()]


def prompted_words(label: Label) -> list[str]:
    """CLIP prompts of a label's name and synonyms (ours)."""
    return prompts_for(label.words)


def bare_name(label: Label) -> list[str]:
    """The label's name alone, as the released code gave CLIP its class names."""
    return [label.name]


def label_embeddings(
    clip: TextImageEmbedder, labels: Sequence[Label], texts: Callable[[Label], Sequence[str]] = prompted_words
) -> np.ndarray:
    """One unit-norm text embedding per label: the mean over its ``texts`` (by default the prompts of its words)."""
    rows = []
    for label in labels:
        mean = clip.embed_texts(list(texts(label))).mean(axis=0)
        rows.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
    return np.stack(rows).astype(np.float32)
