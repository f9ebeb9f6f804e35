"""FreeSeg-Diff's two entry points: ``encode`` once per image, ``segment`` per question.

Like segment-anything's ``SamPredictor`` (``set_image`` then ``predict``): ``encode``
runs the expensive, label-independent models (captioner, VAE and U-Net, CLIP on the
whole image) and returns an :class:`Encoding`; ``segment`` answers for a label set, a K
and a refinement from that encoding, with only K-means, CLIP on the clusters and the CRF.
``segment(encode(image), image, ...)`` is the one-shot run, so a stored encoding gives
exactly its masks.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from spacy.language import Language

from backend import __version__
from backend.models import load_model_parts, resolve_device
from backend.pipeline.caption import Captioner
from backend.pipeline.candidates import caption_nouns, match_candidates, prompt_words
from backend.pipeline.clip_embeddings import LOGIT_SCALE, ClipEmbedder, TextImageEmbedder
from backend.pipeline.clustering import cluster_feature_grid
from backend.pipeline.encoding import FORMAT_VERSION, Encoding
from backend.pipeline.features import FeatureExtractor, FeatureSettings
from backend.pipeline.labelling import ClusterLabel, assign_labels, cluster_label_scores, cluster_masks, softmax
from backend.pipeline.refine import refine_masks
from backend.pipeline.vocabulary import Label, label_embeddings
from backend.settings import RefineMethod, Settings

StageObserver = Callable[[str, float], None]


@dataclass(frozen=True)
class SegmentOptions:
    """What a caller may change per request; defaults come from the settings."""

    k: int = 4
    refine: RefineMethod = "crf"
    use_caption: bool = True  # False: every label is a candidate (the paper's "no caption" ablation)
    caption_fallback: bool = True  # no candidate from the caption: take CLIP's best labels for the image
    seed: int = 0
    prompt: str = ""  # words an annotator typed: they pick the candidate labels instead of the caption

    @classmethod
    def from_settings(cls, settings: Settings) -> SegmentOptions:
        return cls(k=settings.k, refine=settings.refine, use_caption=settings.use_caption,
                   caption_fallback=settings.caption_fallback, seed=settings.seed)


@dataclass(frozen=True)
class Click:
    """An annotator's point (pixels of the displayed image) and the label they gave it."""

    x: float
    y: float
    label: int  # index into the labels passed to segment_clicks()


@dataclass(frozen=True)
class Region:
    label: int  # index into the labels passed to segment()
    name: str
    score: float  # CLIP probability of this label for the region's cluster


@dataclass
class Segmentation:
    label_map: np.ndarray  # (H, W) uint16: 0 unlabeled, i for labels[i - 1]
    regions: list[Region]
    caption: str
    candidates: list[str]
    used_fallback: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def score(self) -> float:
        """The prediction's score: the mean of its regions' scores (0 when it has none)."""
        return float(np.mean([r.score for r in self.regions])) if self.regions else 0.0


class Segmenter:
    """The pipeline over a fixed set of models."""

    def __init__(
        self,
        captioner: Callable[[Sequence[np.ndarray]], list[str]],
        features: Callable[[Sequence[np.ndarray]], np.ndarray],
        clip: TextImageEmbedder,
        nlp: Language,
        fingerprint: str,
        device: torch.device | str = "cpu",
    ):
        self.captioner, self.features, self.clip, self.nlp = captioner, features, clip, nlp
        self.fingerprint = fingerprint
        self.device = torch.device(device)
        self.observer: StageObserver | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Segmenter:
        """The process's segmenter for these settings; models load on the first call only."""
        return _cached_segmenter(settings)

    @contextmanager
    def _stage(self, name: str, timings: dict[str, float]) -> Iterator[None]:
        start = time.perf_counter()
        yield
        elapsed = time.perf_counter() - start
        timings[name] = timings.get(name, 0.0) + elapsed
        if self.observer is not None:
            self.observer(name, elapsed)

    def encode(self, image: np.ndarray) -> Encoding:
        return self.encode_batch([image])[0]

    def encode_batch(self, images: Sequence[np.ndarray]) -> list[Encoding]:
        """Caption, U-Net features and whole-image CLIP embedding of each (H, W, 3) uint8 image."""
        timings: dict[str, float] = {}
        with self._stage("caption", timings):
            captions = self.captioner(images)
        with self._stage("features", timings):
            grids = self.features(images)
            image_vectors = self.clip.embed_images(images)
        return [
            Encoding(features=grid, image_embedding=vector.astype(np.float32), caption=caption,
                     width=image.shape[1], height=image.shape[0], fingerprint=self.fingerprint)
            for image, grid, vector, caption in zip(images, grids, image_vectors, captions)
        ]

    def segment(
        self, encoding: Encoding, image: np.ndarray, labels: Sequence[Label], options: SegmentOptions
    ) -> Segmentation:
        """A label map over ``labels`` for ``image``, from its ``encoding``."""
        _check_compatible(encoding, image, self.fingerprint)
        if not labels:
            raise ValueError("segment() needs at least one label")
        timings: dict[str, float] = {}
        with self._stage("candidates", timings):
            vectors = label_embeddings(self.clip, labels)
            candidates, used_fallback = self._candidates(encoding, labels, vectors, options)
        masks = self._cluster_masks(encoding, options, timings)
        with self._stage("labelling", timings):
            assigned = []
            if candidates:
                scores = cluster_label_scores(self.clip, image, masks, vectors)
                assigned = assign_labels(scores, candidates)
        segmentation = self._refined(encoding, image, masks, assigned, labels, options, timings)
        segmentation.candidates = [labels[i].name for i in candidates]
        segmentation.used_fallback = used_fallback
        return segmentation

    def segment_clicks(
        self, encoding: Encoding, image: np.ndarray, labels: Sequence[Label], clicks: Sequence[Click],
        options: SegmentOptions,
    ) -> Segmentation:
        """The refined cluster under each click, with the click's label (a second click on a cluster loses)."""
        _check_compatible(encoding, image, self.fingerprint)
        timings: dict[str, float] = {}
        masks = self._cluster_masks(encoding, options, timings)
        assigned: dict[int, ClusterLabel] = {}
        for click in clicks:
            row = min(max(int(click.y), 0), encoding.height - 1)
            column = min(max(int(click.x), 0), encoding.width - 1)
            cluster = int(masks[:, row, column].argmax())
            assigned.setdefault(cluster, ClusterLabel(cluster=cluster, label=click.label, score=1.0))
        return self._refined(encoding, image, masks, list(assigned.values()), labels, options, timings)

    def _cluster_masks(self, encoding: Encoding, options: SegmentOptions, timings: dict[str, float]) -> np.ndarray:
        with self._stage("clustering", timings):
            grid = cluster_feature_grid(encoding.features.astype(np.float32), options.k, options.seed, self.device)
            return cluster_masks(grid, encoding.height, encoding.width)

    def _refined(
        self, encoding: Encoding, image: np.ndarray, masks: np.ndarray, assigned: Sequence[ClusterLabel], labels: Sequence[Label],
        options: SegmentOptions, timings: dict[str, float],
    ) -> Segmentation:
        """The label map of the labelled clusters after refinement; regions refinement emptied are dropped."""
        with self._stage("refine", timings):
            refined = refine_masks(image, masks[[a.cluster for a in assigned]], options.refine, self.device)
        label_map = np.zeros(masks.shape[1:], dtype=np.uint16)
        regions = []
        for assignment, mask in zip(assigned, refined):
            if mask.any():
                label_map[mask] = assignment.label + 1
                regions.append(Region(assignment.label, labels[assignment.label].name, assignment.score))
        return Segmentation(label_map=label_map, regions=regions, caption=encoding.caption, candidates=[],
                            timings=timings)

    def segment_image(self, image: np.ndarray, labels: Sequence[Label], options: SegmentOptions) -> Segmentation:
        """The one-shot run: encode, then segment."""
        return self.segment(self.encode(image), image, labels, options)

    def _candidates(
        self, encoding: Encoding, labels: Sequence[Label], vectors: np.ndarray, options: SegmentOptions
    ) -> tuple[list[int], bool]:
        if options.prompt.strip():
            words = prompt_words(self.nlp, options.prompt)
            return match_candidates(words, labels, vectors, self.clip, drop_far=False), False
        if not options.use_caption:
            return list(range(len(labels))), False
        nouns = caption_nouns(self.nlp, encoding.caption)
        found = match_candidates(nouns, labels, vectors, self.clip)
        if found or not options.caption_fallback:
            return found, False
        return image_level_candidates(encoding.image_embedding, vectors, options.k), True


def image_level_candidates(image_vector: np.ndarray, label_vectors: np.ndarray, limit: int) -> list[int]:
    """The fallback: labels CLIP rates above average for the whole image, best first, at most ``limit``."""
    probabilities = softmax(LOGIT_SCALE * label_vectors @ image_vector)
    ranked = np.argsort(-probabilities, kind="stable")
    above_average = [int(i) for i in ranked if probabilities[i] >= probabilities.mean()]
    return sorted(above_average[: max(limit, 1)])


def _check_compatible(encoding: Encoding, image: np.ndarray, fingerprint: str) -> None:
    if encoding.fingerprint != fingerprint:
        raise ValueError(f"encoding made by other models or feature settings ({encoding.fingerprint} != {fingerprint})")
    if (encoding.height, encoding.width) != image.shape[:2]:
        raise ValueError(
            f"encoding is of a {encoding.width}x{encoding.height} image, not {image.shape[1]}x{image.shape[0]}"
        )


def feature_settings(settings: Settings) -> FeatureSettings:
    return FeatureSettings(image_size=settings.image_size, kind=settings.features,
                           level=settings.feature_level, grid=settings.feature_grid)


def models_fingerprint(settings: Settings, dtype: torch.dtype) -> str:
    """A hash of everything an Encoding depends on: models, feature settings, precision, format."""
    described = {
        "format": FORMAT_VERSION,
        "profile": settings.models,
        "dtype": str(dtype),
        "features": feature_settings(settings).__dict__,
        "captioner": [settings.captioner, settings.captioner_device],
    }
    if settings.models == "pretrained":
        described.update(sd=settings.sd_model, clip=[settings.clip_model, settings.clip_pretrained],
                         captioner_model=settings.captioner_source)
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def model_version(settings: Settings) -> str:
    """The ``model_version`` of every prediction; non-pretrained profiles say so in it."""
    _, dtype = resolve_device(settings.device)
    version = f"freesegdiff-{__version__}-{models_fingerprint(settings, dtype)[:8]}"
    return version if settings.models == "pretrained" else f"{version}-{settings.models}-random-weights"


@lru_cache(maxsize=2)
def _cached_segmenter(settings: Settings) -> Segmenter:
    parts = load_model_parts(settings)
    device, dtype = parts.device, parts.dtype
    return Segmenter(
        captioner=Captioner(parts.captioner, parts.captioner_device, parts.captioner_dtype),
        features=FeatureExtractor(parts.stable_diffusion, feature_settings(settings), device, dtype),
        clip=ClipEmbedder(parts.clip, device, dtype),
        nlp=parts.nlp,
        fingerprint=models_fingerprint(settings, dtype),
        device=device,
    )
