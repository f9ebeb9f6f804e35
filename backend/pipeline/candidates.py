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

The released code's rules (FREESEG_FIDELITY=release) are here too: ``release_caption_nouns``
and ``ReleaseCandidates``. Its nouns are each NOUN's text and each adjective's head, whatever
that head is, repeats kept. Each noun goes to its nearest class by correlation distance between
Stable Diffusion text embeddings (``sd_text``) of the bare noun and of "A photo of {class}", and
is kept when that distance is at most the mean over the caption's nouns; an exact name gets no
shortcut, it is one distance among the others.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from backend.pipeline.clip_embeddings import TextImageEmbedder, prompts_for
from backend.pipeline.sd_text import TextPooler
from backend.pipeline.vocabulary import Label, label_embeddings

if TYPE_CHECKING:  # spaCy is needed only for FREESEG_NOUNS=spacy
    from spacy.language import Language

NounRule = Callable[["Language | None", str], list[str]]  # (spaCy, caption) -> the caption's nouns
RELEASE_CLASS_PROMPT = "A photo of {}"


class CandidateRule(Protocol):
    """A caption's nouns in, the indices (into ``labels``) of the candidate labels out, sorted."""

    def __call__(self, nouns: Sequence[str], labels: Sequence[Label]) -> list[int]: ...

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


def caption_words(nlp: Language | None, caption: str) -> list[str]:
    """FREESEG_NOUNS=words: every word of the caption that is no stop word, lower-cased, each once, untagged.

    For machines without spaCy (the GPU bench's kit has no room for it): words that are no nouns go to the
    candidate rule's distance test like nouns, which keeps those near a label's name.
    """
    words = (word.lower() for word in _WORD.findall(caption))
    return list(dict.fromkeys(w for w in words if w.replace("-", "").isalpha() and w not in ENGLISH_STOP_WORDS))


def release_caption_nouns(nlp: Language, caption: str) -> list[str]:
    """The released code's nouns, in caption order, repeats kept: the text of each NOUN, and of each ADJ's head.

    Only the NOUN or ADJ itself must not be a stop word; the head may be any word ("sky is blue" gives "is").
    """
    words = []
    for token in nlp(caption):
        if token.is_stop:
            continue
        if token.pos_ == "NOUN":
            words.append(token.text)
        elif token.pos_ == "ADJ":
            words.append(token.head.text)
    return words


def prompt_phrases(prompt: str) -> list[str]:
    """A typed prompt's phrases, lower-cased: split at commas, semicolons, new lines and "and"."""
    parts = (" ".join(_WORD.findall(part)) for part in _PHRASE_SEPARATORS.split(prompt.lower()))
    return list(dict.fromkeys(part for part in parts if part))


def prompt_words(prompt: str, labels: Sequence[Label]) -> list[str]:
    """What a typed prompt names: the label words each phrase contains, else the phrase itself.

    "a red car" gives "car" and "dog cat" gives "dog" and "cat" (words of labels, found
    without separators); "sailboat" stays "sailboat", to be matched to its nearest label.
    Only n-grams as long as the longest label word can name one, so the cost grows with the
    phrase's length times that word count, not with the cube of the phrase's length.
    """
    label_words = {word for label in labels for word in label.words}
    longest = max((len(word.split()) for word in label_words), default=0)
    found: list[str] = []
    for phrase in prompt_phrases(prompt):
        words = phrase.split()
        named = [w for n in range(min(len(words), longest), 0, -1) for w in _ngrams(words, n) if w in label_words]
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


class ClipCandidates:
    """Our rule (``match_candidates``) with CLIP's text embeddings of the labels' prompts."""

    def __init__(self, clip: TextImageEmbedder):
        self.clip = clip

    def __call__(self, nouns: Sequence[str], labels: Sequence[Label]) -> list[int]:
        return match_candidates(nouns, labels, label_embeddings(self.clip, labels), self.clip)


class ReleaseCandidates:
    """The released code's rule, with Stable Diffusion's text encoder (``encode``: texts to pooled vectors)."""

    def __init__(self, encode: TextPooler):
        self.encode = encode

    def __call__(self, nouns: Sequence[str], labels: Sequence[Label]) -> list[int]:
        if not nouns or not labels:
            return []
        words = [release_class_words(label) for label in labels]
        vectors = self.encode([*nouns, *(RELEASE_CLASS_PROMPT.format(w) for label_words in words for w in label_words)])
        noun_vectors, rest = vectors[: len(nouns)], vectors[len(nouns) :]
        bounds = np.cumsum([0, *(len(label_words) for label_words in words)])
        class_vectors = np.stack([rest[start:end].mean(axis=0) for start, end in zip(bounds, bounds[1:])])
        return nearest_within_mean(noun_vectors, class_vectors)


def release_class_words(label: Label) -> list[str]:
    """The words whose "A photo of {word}" embeddings a class averages: each word of its name and synonyms.

    The released code split a class name with spaces into words and averaged their prompts' embeddings.
    """
    return list(dict.fromkeys(word for phrase in label.words for word in phrase.split()))


def nearest_within_mean(noun_vectors: np.ndarray, class_vectors: np.ndarray) -> list[int]:
    """Each noun's nearest class by correlation distance, kept when at most the mean over all nouns; sorted."""
    distance = correlation_distances(noun_vectors, class_vectors)
    nearest, closest = distance.argmin(axis=1), distance.min(axis=1)
    return sorted({int(c) for c, d in zip(nearest, closest) if d <= closest.mean()})


def correlation_distances(rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """(N, M) correlation distances, 1 - Pearson correlation, of each of ``rows`` to each of ``columns``."""

    def standardised(vectors: np.ndarray) -> np.ndarray:
        centred = np.asarray(vectors, np.float64) - np.mean(vectors, axis=1, keepdims=True)
        return centred / np.linalg.norm(centred, axis=1, keepdims=True)

    return 1.0 - standardised(rows) @ standardised(columns).T
