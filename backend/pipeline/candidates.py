"""Stage 2: candidate labels from the caption's nouns.

Nouns are the caption's NOUN tokens that are not stop words, plus the head noun of each
adjective (spaCy). A noun equal to a label or one of its synonyms makes that label a
candidate outright. Every other noun is matched to its nearest label by cosine distance
between CLIP text embeddings and kept only when that distance is at most the mean
nearest distance over all of the caption's nouns, exact matches counting at distance 0
("above average distance is ignored", as in the paper and the authors' code).
The released code used Stable Diffusion's text encoder mean-pooled over padding, which
made most class embeddings identical; CLIP's text tower with a prompt template does not.

Typed prompts are not captions: a person means every word, whatever spaCy would tag it.
A prompt is split into phrases; a phrase that names labels (or synonyms) word for word
gives those labels, and any other phrase is matched whole to its nearest label.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from spacy.language import Language

from backend.pipeline.clip_embeddings import TextImageEmbedder, prompts_for
from backend.pipeline.vocabulary import Label

_PHRASE_SEPARATORS = re.compile(r"[,;\n]|\band\b")
_WORD = re.compile(r"[\w'-]+")  # a phrase's words, without its punctuation


def caption_nouns(nlp: Language, caption: str) -> list[str]:
    """The caption's nouns as lower-cased lemmas, each once, in caption order."""
    nouns: list[str] = []
    for token in nlp(caption):
        if token.pos_ == "NOUN" and not token.is_stop:
            nouns.append(token.lemma_.lower())
        elif token.pos_ == "ADJ" and token.head.pos_ == "NOUN" and not token.head.is_stop:
            nouns.append(token.head.lemma_.lower())
    return list(dict.fromkeys(n for n in nouns if n.isalpha() or " " in n or "-" in n))


def prompt_phrases(prompt: str) -> list[str]:
    """A typed prompt's phrases, lower-cased: split at commas, semicolons, new lines and "and"."""
    parts = (" ".join(_WORD.findall(part)) for part in _PHRASE_SEPARATORS.split(prompt.lower()))
    return list(dict.fromkeys(part for part in parts if part))


def prompt_words(prompt: str, labels: Sequence[Label]) -> list[str]:
    """What a typed prompt names: the label words each phrase contains, else the phrase itself.

    "a red car" gives "car" and "dog cat" gives "dog" and "cat" (words of labels, found
    without separators); "sailboat" stays "sailboat", to be matched to its nearest label.
    """
    label_words = {word for label in labels for word in label.words}
    found: list[str] = []
    for phrase in prompt_phrases(prompt):
        words = phrase.split()
        named = [w for n in range(len(words), 0, -1) for w in _ngrams(words, n) if w in label_words]
        found.extend(named or [phrase])
    return list(dict.fromkeys(found))


def _ngrams(words: Sequence[str], n: int) -> list[str]:
    return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]


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
        mean_distance = distance.sum() / len(nouns)  # exact matches count in the mean, at distance 0
        candidates.update(int(i) for i, d in zip(nearest, distance) if not drop_far or d <= mean_distance + 1e-6)
    return sorted(candidates)
