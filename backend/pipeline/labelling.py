"""Stage 5: name each class-agnostic mask with CLIP.

For each cluster, the image with every pixel outside the cluster set to black is
embedded by CLIP (padded to a square, see ``clip_embeddings``) and scored against every
label: a softmax over image-text similarities. Scores of non-candidate labels are zeroed;
each label keeps only its best cluster; each cluster takes its best remaining label; a
cluster no label picked stays unlabeled. All clusters of a batch of images go through CLIP in
one call.

What the masked images are scored against, and how CLIP sees them, is a ``MaskNaming``: ours
(``PROMPTS_PADDED``) or the released code's (``BARE_NAMES_CROPPED``: bare class names, CLIP's
centre crop, which loses cluster pixels near the edges of a non-square image).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from backend.pipeline.clip_embeddings import LOGIT_SCALE, TextImageEmbedder, centre_square
from backend.pipeline.vocabulary import Label, bare_name, label_embeddings, prompted_words


@dataclass(frozen=True)
class MaskNaming:
    """What CLIP compares each masked image with (``texts`` of a label) and how it is shown it (``view``)."""

    texts: Callable[[Label], Sequence[str]]
    view: Callable[[np.ndarray], np.ndarray]  # a masked image -> what goes to CLIP (which pads it to a square)

    def label_vectors(self, clip: TextImageEmbedder, labels: Sequence[Label]) -> np.ndarray:
        """(L, D) unit-norm embeddings the masked images are scored against."""
        return label_embeddings(clip, labels, self.texts)


def _as_is(image: np.ndarray) -> np.ndarray:
    return image


PROMPTS_PADDED = MaskNaming(texts=prompted_words, view=_as_is)
BARE_NAMES_CROPPED = MaskNaming(texts=bare_name, view=centre_square)


@dataclass(frozen=True)
class ClusterLabel:
    """The label a cluster got (an index into the vocabulary) and its CLIP probability."""

    cluster: int
    label: int
    score: float


def cluster_masks(cluster_grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """(K, H, W) boolean masks: the (G, G) cluster map upsampled with nearest neighbours."""
    full = cv2.resize(cluster_grid.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
    return full[None] == np.arange(int(cluster_grid.max()) + 1)[:, None, None]


def masked_images(image: np.ndarray, masks: np.ndarray) -> list[np.ndarray]:
    """The image with every pixel outside each mask set to black."""
    return [np.where(mask[..., None], image, 0).astype(np.uint8) for mask in masks]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def cluster_label_scores(
    clip: TextImageEmbedder, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], label_vectors: np.ndarray,
    view: Callable[[np.ndarray], np.ndarray] = _as_is,
) -> list[np.ndarray]:
    """(K_i, L) probabilities of each label for each cluster's masked image (as ``view`` shows it), for each image.

    The masked images of all images go through CLIP in one call: one batch on the GPU.
    """
    masked = [view(shown) for image, image_masks in zip(images, masks) for shown in masked_images(image, image_masks)]
    if not masked:
        return [np.zeros((0, len(label_vectors)), np.float32) for _ in images]
    probabilities = softmax(LOGIT_SCALE * clip.embed_images(masked) @ label_vectors.T)
    return np.split(probabilities, np.cumsum([len(image_masks) for image_masks in masks])[:-1])


def assign_labels(scores: np.ndarray, candidates: Sequence[int]) -> list[ClusterLabel]:
    """The paper's assignment: candidates only, one cluster per label, best label per cluster."""
    kept = np.zeros_like(scores)
    for label in candidates:
        best_cluster = int(scores[:, label].argmax())
        kept[best_cluster, label] = scores[best_cluster, label]
    assigned = []
    for cluster, row in enumerate(kept):
        if row.max() > 0:
            label = int(row.argmax())
            assigned.append(ClusterLabel(cluster=cluster, label=label, score=float(scores[cluster, label])))
    return assigned
