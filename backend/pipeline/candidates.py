"""Stage 2: candidate labels from the caption's nouns.

Nouns are the caption's NOUN tokens that are not stop words, plus the head noun of each
adjective (spaCy). A noun equal to a label or one of its synonyms makes that label a
candidate outright. Every other noun is matched to its nearest label by cosine distance
between CLIP text embeddings and kept only when that distance is at most the mean
nearest distance of those nouns ("above average distance is ignored", as in the paper).
The released code used Stable Diffusion's text encoder mean-pooled over padding, which
made most class embeddings identical; CLIP's text tower with a prompt template does not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from spacy.language import Language

from backend.pipeline.clip_embeddings import TextImageEmbedder, prompts_for
from backend.pipeline.vocabulary import Label


def caption_nouns(nlp: Language, caption: str) -> list[str]:
    """The caption's nouns as lower-cased lemmas, each once, in caption order."""
    nouns: list[str] = []
    for token in nlp(caption):
        if token.pos_ == "NOUN" and not token.is_stop:
            nouns.append(token.lemma_.lower())
        elif token.pos_ == "ADJ" and token.head.pos_ == "NOUN" and not token.head.is_stop:
            nouns.append(token.head.lemma_.lower())
    return list(dict.fromkeys(n for n in nouns if n.isalpha() or " " in n or "-" in n))


def prompt_words(nlp: Language, prompt: str) -> list[str]:
    """The nouns of a typed prompt, or its words when it has none ("sofa" alone may not parse as a noun)."""
    return caption_nouns(nlp, prompt) or [w.lower() for w in prompt.replace(",", " ").split() if w.isalpha()]


def match_candidates(
    nouns: Sequence[str], labels: Sequence[Label], label_vectors: np.ndarray, clip: TextImageEmbedder,
    drop_far: bool = True,
) -> list[int]:
    """Indices (into ``labels``) of the candidate labels for these nouns, sorted.

    ``drop_far=False`` keeps every noun's nearest label: for words a person typed, which
    are meant, unlike a captioner's.
    """
    exact = {word: index for index, label in enumerate(labels) for word in label.words}
    candidates = {exact[noun] for noun in nouns if noun in exact}
    others = [noun for noun in nouns if noun not in exact]
    if others and len(labels):
        similarity = clip.embed_texts(prompts_for(others)) @ label_vectors.T
        nearest = similarity.argmax(axis=1)
        distance = 1.0 - similarity.max(axis=1)
        candidates.update(int(i) for i, d in zip(nearest, distance) if not drop_far or d <= distance.mean() + 1e-6)
    return sorted(candidates)
