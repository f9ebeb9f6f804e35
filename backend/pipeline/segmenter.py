"""FreeSeg-Diff's two entry points: ``encode`` once per image, ``segment`` per question.

Like segment-anything's ``SamPredictor`` (``set_image`` then ``predict``): ``encode``
runs the expensive, label-independent models (captioner, VAE and U-Net, CLIP on the
whole image) and returns an :class:`Encoding`; ``segment`` answers for a label set, a K
and a refinement from that encoding, with only K-means, CLIP on the clusters and the CRF.
``segment(encode(image), image, ...)`` is the one-shot run, so a stored encoding gives
exactly its masks.

For throughput, both work on batches and overlap what runs on different hardware: the
captioner runs beside the U-Net on CUDA (its own thread and stream), CLIP names the
clusters of a whole batch in one call, and ``propose_batch`` only starts the refinement
(the CPU CRF runs in child processes), so the caller can encode the next batch while
it runs; the proposal's ``finish`` waits for it. ``segment_batches`` chains all of this over a stream.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch

from backend.pipeline.candidates import match_candidates, prompt_words
from backend.pipeline.clip_embeddings import LOGIT_SCALE, TextImageEmbedder
from backend.pipeline.clustering import cluster_feature_grid
from backend.pipeline.confidence import Confidence, clip_confidence
from backend.pipeline.coordinates import to_frame
from backend.pipeline.encoding import Encoding
from backend.pipeline.exemplars import Exemplars, label_with_exemplars
from backend.pipeline.fidelity import StageRules, our_rules
from backend.pipeline.labelling import ClusterLabel, assign_labels, cluster_label_scores, cluster_masks, softmax
from backend.pipeline.refine import PendingMasks, Refiner
from backend.pipeline.upsampling import working_image
from backend.pipeline.vocabulary import Label, label_embeddings
from backend.options import SegmentOptions

if TYPE_CHECKING:  # spaCy is needed only for FREESEG_NOUNS=spacy
    from spacy.language import Language

log = logging.getLogger(__name__)
StageObserver = Callable[[str, float], None]
Clustering = Callable[[np.ndarray, int, int], np.ndarray]  # (C, G, G) float32 features, K, seed -> (G, G) clusters
Tag = TypeVar("Tag")  # what a caller of ``segment_batches`` knows a batch by
NO_CONFIDENCE = Confidence((), 0.0)  # of an image no candidate label was found for: nothing labelled


@dataclass(frozen=True)
class Click:
    """An annotator's point (pixels of the displayed image) and the label they gave it."""

    x: float
    y: float
    label: int  # index into the labels passed to propose_clicks()


@dataclass(frozen=True)
class Region:
    label: int  # index into the labels passed to segment()
    name: str
    score: float  # the region's confidence in [0, 1] (``backend.pipeline.confidence``)


def map_value(label: int) -> int:
    """The value of ``labels[label]`` in a label map, where 0 is unlabeled: the one place that convention lives."""
    return label + 1


@dataclass
class Segmentation:
    label_map: np.ndarray  # (H, W) uint16: 0 unlabeled, map_value(i) for labels[i]
    regions: list[Region]
    caption: str
    candidates: list[str]
    used_fallback: bool = False
    score: float = 0.0  # the prediction's confidence in [0, 1], over the whole image (``backend.pipeline.confidence``)

    def region_mask(self, region: Region) -> np.ndarray:
        """(H, W) bool: the pixels of ``region``, as every export draws it."""
        return self.label_map == map_value(region.label)


@dataclass
class Proposal:
    """A segmentation before refinement: the labelled clusters, their refinement started."""

    assigned: list[ClusterLabel]
    confidence: Confidence  # of ``assigned``, in that order, and of the image
    refined: PendingMasks  # waits for the refined masks of ``assigned``, in that order
    labels: Sequence[Label]
    caption: str
    candidates: list[str]
    used_fallback: bool
    observer: StageObserver | None = None

    def finish(self) -> Segmentation:
        """Wait for the refinement; the label map of the labelled clusters (regions it emptied are dropped)."""
        with _timed(self.observer, "refine"):
            refined = self.refined()
        label_map = np.zeros(refined.shape[1:], dtype=np.uint16)
        regions = []
        for assignment, mask, confidence in zip(self.assigned, refined, self.confidence.regions, strict=True):
            if mask.any():
                label_map[mask] = map_value(assignment.label)
                regions.append(Region(assignment.label, self.labels[assignment.label].name, confidence))
        return Segmentation(label_map=label_map, regions=regions, caption=self.caption,
                            candidates=self.candidates, used_fallback=self.used_fallback, score=self.confidence.image)


@contextmanager
def _timed(observer: StageObserver | None, stage: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    if observer is not None:
        observer(stage, time.perf_counter() - start)


class Segmenter:
    """The pipeline over a fixed set of models."""

    def __init__(
        self,
        captioner: Callable[[Sequence[np.ndarray]], list[str]],
        features: Callable[[Sequence[np.ndarray]], np.ndarray],
        clip: TextImageEmbedder,
        nlp: Language | None,
        fingerprint: str,
        device: torch.device | str = "cpu",
        refiner: Refiner | None = None,
        overlap_caption: bool = False,
        working_max_side: int | None = None,
        clustering: Clustering | None = None,
        observer: StageObserver | None = None,
        rules: StageRules | None = None,
    ):
        self.captioner, self.features, self.clip, self.nlp = captioner, features, clip, nlp
        self.rules = rules or our_rules(clip)  # nouns, candidates and mask naming (FREESEG_FIDELITY)
        self.working_max_side = working_max_side  # encoders, clusters, CLIP crops and refinement see this at most
        self.fingerprint = fingerprint
        self.device = torch.device(device)
        self.refiner = refiner or Refiner(self.device)
        self.clustering = clustering or (lambda features, k, seed: cluster_feature_grid(features, k, seed, self.device))
        # On CUDA the captioner's small beam-search kernels fill the GPU beside the U-Net's;
        # on a CPU both would only fight for the same cores.
        self._caption_thread = ThreadPoolExecutor(1, thread_name_prefix="caption") if overlap_caption else None
        self.observer = observer

    def observed_by(self, observer: StageObserver | None) -> Segmenter:
        """The same pipeline over the same models, reporting each stage's time to ``observer``."""
        observed = copy.copy(self)
        observed.observer = observer
        return observed

    def _stage(self, name: str) -> AbstractContextManager[None]:
        return _timed(self.observer, name)

    def encode(self, image: np.ndarray) -> Encoding:
        return self.encode_batch([image])[0]

    def encode_batch(self, images: Sequence[np.ndarray]) -> list[Encoding]:
        """Caption, U-Net features and whole-image CLIP embedding of each (H, W, 3) uint8 image.

        The models see at most ``working_max_side`` pixels a side (they resize to far less anyway).
        """
        working = [working_image(image, self.working_max_side) for image in images]
        pending = self._caption_thread.submit(self._captions, working) if self._caption_thread else None
        with self._stage("features"):
            grids = self.features(working)
            image_vectors = self.clip.embed_images(working)
        captions = pending.result() if pending else self._captions(working)
        return [
            Encoding(features=grid, image_embedding=vector.astype(np.float32), caption=caption,
                     width=image.shape[1], height=image.shape[0], fingerprint=self.fingerprint)
            for image, grid, vector, caption in zip(images, grids, image_vectors, captions)
        ]

    def _captions(self, images: Sequence[np.ndarray]) -> list[str]:
        with self._stage("caption"):
            return self.captioner(images)

    def encode_many(self, images: Sequence[np.ndarray], max_batch: int) -> list[Encoding]:
        """``encode_batch`` over ``max_batch`` images at a time; out of GPU memory, the batch is halved and retried."""
        encodings: list[Encoding] = []
        batch = max_batch
        while len(encodings) < len(images):
            chunk = images[len(encodings) : len(encodings) + batch]
            try:
                encodings += self.encode_batch(chunk)
            except torch.OutOfMemoryError:
                if batch == 1:
                    raise
                batch = max(batch // 2, 1)
                log.warning("out of GPU memory encoding %d images at once; retrying %d at a time", len(chunk), batch)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        return encodings

    def segment(
        self, encoding: Encoding, image: np.ndarray, labels: Sequence[Label], options: SegmentOptions,
        exemplars: Exemplars | None = None,
    ) -> Segmentation:
        """A label map over ``labels`` for ``image``, from its ``encoding`` (and a project's ``exemplars``)."""
        return self.propose_batch([encoding], [image], labels, options, exemplars)[0].finish()

    def segment_batches(
        self, batches: Iterable[tuple[Tag, Sequence[np.ndarray]]], labels: Sequence[Label], options: SegmentOptions,
        exemplars: Exemplars | None = None,
    ) -> Iterator[tuple[Tag, list[Segmentation]]]:
        """Encode and segment batch after batch; a batch is refined while the next one is encoded.

        Each batch comes with a tag of the caller's (its images' names, say) that is handed back
        with its segmentations: they come out one batch behind the images going in. A batch that
        runs out of GPU memory is encoded in halves (``encode_many``).
        """
        encoded = ((tag, self.encode_many(images, len(images)), images) for tag, images in batches)
        return self.segment_encoded(encoded, labels, options, exemplars)

    def segment_encoded(
        self, batches: Iterable[tuple[Tag, Sequence[Encoding], Sequence[np.ndarray]]], labels: Sequence[Label],
        options: SegmentOptions, exemplars: Exemplars | None = None,
    ) -> Iterator[tuple[Tag, list[Segmentation]]]:
        """``segment_batches`` for batches whose encodings the caller gives (from a feature cache, say): taken
        from ``batches`` only once the previous batch is proposed, so that it is refined meanwhile."""
        previous: tuple[Tag, list[Proposal]] | None = None
        for tag, encodings, images in batches:
            current = (tag, self.propose_batch(encodings, images, labels, options, exemplars))
            if previous is not None:
                yield previous[0], [proposal.finish() for proposal in previous[1]]
            previous = current
        if previous is not None:
            yield previous[0], [proposal.finish() for proposal in previous[1]]

    def propose_batch(
        self, encodings: Sequence[Encoding], images: Sequence[np.ndarray], labels: Sequence[Label],
        options: SegmentOptions, exemplars: Exemplars | None = None,
    ) -> list[Proposal]:
        """Candidates, clusters and their labels for each image; refinement started, not awaited.

        With ``exemplars`` (a project's memory), taught labels are candidates too and the labels
        follow ``exemplars.label_with_exemplars``; None, or none of ``labels`` taught, is the paper's.
        """
        for encoding, image in zip(encodings, images, strict=True):
            _check_compatible(encoding, image, self.fingerprint)
        if not labels:
            raise ValueError("segment() needs at least one label")
        with self._stage("candidates"):
            vectors = self.rules.naming.label_vectors(self.clip, labels)
            chosen = [self._candidates(encoding, labels, vectors, options) for encoding in encodings]
            taught = exemplars.taught(labels) if exemplars is not None else []
            if taught:
                chosen = [(sorted(set(candidates) | set(taught)), fallback) for candidates, fallback in chosen]
            else:
                exemplars = None  # no label of this request taught: the paper's labelling, exactly
        working = [working_image(image, self.working_max_side) for image in images]
        clusters = [self._clusters(encoding, options, small.shape[:2]) for encoding, small in zip(encodings, working)]
        grids, masks = [grid for grid, _ in clusters], [image_masks for _, image_masks in clusters]
        with self._stage("labelling"):
            named = [i for i, (candidates, _) in enumerate(chosen) if candidates]
            scores = cluster_label_scores(self.clip, [working[i] for i in named], [masks[i] for i in named], vectors,
                                          self.rules.naming.view)
            assigned: dict[int, tuple[list[ClusterLabel], Confidence]] = {}
            for i, image_scores in zip(named, scores):
                if exemplars is None:
                    assignment = assign_labels(image_scores, chosen[i][0])
                    assigned[i] = assignment, clip_confidence(grids[i], image_scores, assignment)
                else:
                    masks[i], assignment, confidence = label_with_exemplars(
                        encodings[i].features, grids[i], image_scores, chosen[i][0], labels, exemplars,
                        *working[i].shape[:2], self.device)
                    assigned[i] = assignment, confidence
        return [
            self._start_refinement(encoding, image, small, image_masks, *assigned.get(i, ([], NO_CONFIDENCE)), labels,
                                   options, candidates=[labels[c].name for c in candidates],
                                   used_fallback=used_fallback)
            for i, (encoding, image, small, image_masks, (candidates, used_fallback))
            in enumerate(zip(encodings, images, working, masks, chosen))
        ]

    def propose_clicks(
        self, encoding: Encoding, image: np.ndarray, labels: Sequence[Label], clicks: Sequence[Click],
        options: SegmentOptions,
    ) -> Proposal:
        """The cluster under each click, with the click's label (a second click on a cluster loses)."""
        _check_compatible(encoding, image, self.fingerprint)
        small = working_image(image, self.working_max_side)
        _, masks = self._clusters(encoding, options, small.shape[:2])
        assigned: dict[int, ClusterLabel] = {}
        for click in clicks:
            x, y = to_frame(click.x, click.y, (encoding.width, encoding.height), (small.shape[1], small.shape[0]))
            row = min(max(int(y), 0), small.shape[0] - 1)
            column = min(max(int(x), 0), small.shape[1] - 1)
            cluster = int(masks[:, row, column].argmax())
            assigned.setdefault(cluster, ClusterLabel(cluster=cluster, label=click.label, score=1.0))
        # the annotator named these regions: nothing to doubt
        sure = Confidence((1.0,) * len(assigned), 1.0 if assigned else 0.0)
        return self._start_refinement(encoding, image, small, masks, list(assigned.values()), sure, labels, options,
                                      candidates=[], used_fallback=False)

    def _clusters(
        self, encoding: Encoding, options: SegmentOptions, size: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The (G, G) cluster map and its (K, h, w) masks at ``size`` (the working size of the image)."""
        with self._stage("clustering"):
            grid = self.clustering(encoding.features.astype(np.float32), options.k, options.seed)
            return grid, cluster_masks(grid, *size)

    def _start_refinement(
        self, encoding: Encoding, image: np.ndarray, small: np.ndarray, masks: np.ndarray,
        assigned: list[ClusterLabel], confidence: Confidence, labels: Sequence[Label], options: SegmentOptions,
        candidates: list[str], used_fallback: bool,
    ) -> Proposal:
        """Refinement of the assigned clusters' masks on ``small``, brought to ``image``'s size."""
        refined = self.refiner.start(small, masks[[a.cluster for a in assigned]], options.refine, full_image=image)
        return Proposal(assigned=assigned, confidence=confidence, refined=refined, labels=labels,
                        caption=encoding.caption, candidates=candidates, used_fallback=used_fallback,
                        observer=self.observer)

    def segment_image(self, image: np.ndarray, labels: Sequence[Label], options: SegmentOptions) -> Segmentation:
        """The one-shot run: encode, then segment."""
        return self.segment(self.encode(image), image, labels, options)

    def _candidates(
        self, encoding: Encoding, labels: Sequence[Label], vectors: np.ndarray, options: SegmentOptions
    ) -> tuple[list[int], bool]:
        if options.prompt.strip():
            words = prompt_words(options.prompt, labels)
            # typed words are ours whatever the fidelity: the released code had no prompts
            prompted = label_embeddings(self.clip, labels)
            return match_candidates(words, labels, prompted, self.clip, drop_far=False), False
        if not options.use_caption:
            return list(range(len(labels))), False
        found = self.rules.candidates(self.rules.nouns(self.nlp, encoding.caption), labels)
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
