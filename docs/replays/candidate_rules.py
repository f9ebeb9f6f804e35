"""Side-by-side replay of candidate rules on synthetic scenes (docs/quality.md, "Candidate rules").

Run from the repository root (writes its scenes and tiny models under /tmp/candidate-rules)::

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python docs/replays/candidate_rules.py 48

The tiny profile's models are random: the figures are the rules' mechanics (which nouns each
rule keeps beside an exact name), not quality. The rules compared: A ours (exact names outright,
counted at 0 in the mean), B the mean over the other nouns only, C no shortcut (every noun by its
CLIP distance), R ``FREESEG_FIDELITY=release``. B and C exist only here, to be compared.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from backend.evaluation.datasets import folder_dataset
from backend.evaluation.scores import ConfusionMatrix, ReleasePerImageMean
from backend.evaluation.synthetic import write_scenes
from backend.images import read_image_file
from backend.models.process import process_segmenter
from backend.pipeline.candidates import ClipCandidates
from backend.pipeline.clip_embeddings import TextImageEmbedder, prompts_for
from backend.options import SegmentOptions
from backend.pipeline.segmenter import Segmenter
from backend.pipeline.vocabulary import Label, label_embeddings
from backend.settings import Settings

FOLDER = Path("/tmp/candidate-rules")
NAMES = ["background", "person", "dog", "car", "chair"]  # the scenes' classes renamed to words captions use
PLAIN = [Label(name) for name in NAMES[1:]]
SYNONYMS = [Label("person", ("man", "woman", "people", "child")), Label("dog"), Label("car", ("truck",)),
            Label("chair", ("sofa",))]
SAID = {"person": "man", "dog": "dog", "car": "car", "chair": "chair"}  # a captioner says "a man", not "a person"
OPTIONS = SegmentOptions(k=4, refine="none", caption_fallback=False)


def nearest_within_mean(clip: TextImageEmbedder, nouns: Sequence[str], labels: Sequence[Label]) -> set[int]:
    similarity = clip.embed_texts(prompts_for(list(nouns))) @ label_embeddings(clip, labels).T
    distance = 1 - similarity.max(axis=1)
    return {int(i) for i, d in zip(similarity.argmax(axis=1), distance) if d <= distance.mean() + 1e-6}


class MeanOverOthers:
    """B: exact names and synonyms outright; the mean over the other nouns only."""

    def __init__(self, clip: TextImageEmbedder):
        self.clip = clip

    def __call__(self, nouns: Sequence[str], labels: Sequence[Label]) -> list[int]:
        exact = {word: index for index, label in enumerate(labels) for word in label.words}
        others = [noun for noun in nouns if noun not in exact]
        found = {exact[noun] for noun in nouns if noun in exact}
        return sorted(found | (nearest_within_mean(self.clip, others, labels) if others else set()))


class NoShortcut:
    """C: every noun by its CLIP distance, exact names included, the mean over all."""

    def __init__(self, clip: TextImageEmbedder):
        self.clip = clip

    def __call__(self, nouns: Sequence[str], labels: Sequence[Label]) -> list[int]:
        return sorted(nearest_within_mean(self.clip, nouns, labels)) if nouns else []


def with_rule(segmenter: Segmenter, rule: type) -> Segmenter:
    changed = copy.copy(segmenter)
    changed.rules = dataclasses.replace(segmenter.rules, candidates=rule(segmenter.clip))
    return changed


def written_caption(truth: np.ndarray) -> str:
    """A caption written from a scene's truth: "a man and a dog on the grass"."""
    said = [SAID[NAMES[c]] for c in np.unique(truth) if c not in (0, 255)]
    return "a " + " and a ".join(said) + " on the grass" if said else "the grass"


def replay(count: int) -> None:
    root = write_scenes(FOLDER / "scenes", count, seed=0)
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    samples = list(folder_dataset(root).samples(root))
    images = [read_image_file(sample.image_path) for sample in samples]
    base = {"models": "tiny", "device": "cpu", "model_dir": FOLDER / "models", "crf_processes": 0}
    ours, release = process_segmenter(Settings(**base)), process_segmenter(Settings(**base, fidelity="release"))
    rules = {"A shortcut, exact at 0 in the mean (ours)": with_rule(ours, ClipCandidates),
             "B shortcut, mean over the other nouns": with_rule(ours, MeanOverOthers),
             "C no shortcut (CLIP distances for all)": with_rule(ours, NoShortcut),
             "R FREESEG_FIDELITY=release": release}
    captioned = {id(ours): ours.encode_many(images, 4), id(release): release.encode_many(images, 4)}
    written = {key: [dataclasses.replace(e, caption=written_caption(s.label)) for e, s in zip(encodings, samples)]
               for key, encodings in captioned.items()}
    for source, encodings in (("tiny captioner", captioned), ("captions written from the truth", written)):
        for vocabulary, labels in (("no synonyms", PLAIN), ("person with synonyms", SYNONYMS)):
            print(f"\n{count} scenes, {source}, labels {vocabulary}")
            first = None
            for name, segmenter in rules.items():
                key = id(release) if segmenter is release else id(ours)
                row, candidates = _score(segmenter, encodings[key], images, samples, labels)
                first = first or candidates
                differ = sum(a != b for a, b in zip(first, candidates))
                print(f"  {name:42s} {row}  differ from A {differ:2d}")


def _score(segmenter: Segmenter, encodings: list, images: list, samples: list, labels: list[Label]) -> tuple[str, list]:
    matrix, authors = ConfusionMatrix(len(NAMES)), ReleasePerImageMean(len(NAMES))
    words = {word: label.name for label in labels for word in label.words}
    candidates, false, persons, found, beside_exact, kept_beside_exact = [], 0, 0, 0, 0, 0
    for sample, image, encoding in zip(samples, images, encodings):
        result = segmenter.segment(encoding, image, labels, OPTIONS)
        matrix.update(result.label_map, sample.label)
        authors.update(result.label_map, sample.label)
        truth = {NAMES[c] for c in np.unique(sample.label) if c not in (0, 255)}
        candidates.append(tuple(result.candidates))
        false += len(set(result.candidates) - truth)
        persons += "person" in truth
        found += "person" in truth and "person" in result.candidates
        nouns = segmenter.rules.nouns(segmenter.nlp, encoding.caption)
        exact = {words[noun.lower()] for noun in nouns if noun.lower() in words}
        if exact and any(noun.lower() not in words for noun in nouns):
            beside_exact += 1
            kept_beside_exact += bool(set(result.candidates) - exact)
    row = (f"cand/img {np.mean([len(c) for c in candidates]):.2f}  false cand/img {false / len(samples):.2f}  "
           f"person found {found}/{persons}  "
           f"exact+other nouns {beside_exact:2d}, other kept in {kept_beside_exact:2d}  "
           f"mIoU {matrix.miou():5.2f}  authors' {authors.value():5.2f}")
    return row, candidates


if __name__ == "__main__":
    replay(int(sys.argv[1]) if len(sys.argv) > 1 else 48)
