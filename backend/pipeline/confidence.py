"""How sure a labelling is, per region and per image, in [0, 1]: what Label Studio sorts tasks by.

Computed per cell of the feature grid from what the labelling already knows, then averaged:

1. **Margin** m: the score of the cell's label minus the best score of any other label (scores as
   the labelling used them: CLIP's for the cell's cluster, or CLIP combined with the exemplars),
   clipped to [0, 1]. A label that barely beats the second, or loses to it, has m near 0.
2. **Exemplar agreement** a: for a taught label, the cell's exemplar probability of it (the
   similarity-weighted share of its nearest exemplars of that label): near 1 when the memory holds
   close examples of it, near 0 when the memory says something else or holds nothing alike.
   An untaught label has a = 0: only CLIP vouches for it.
3. The cell's confidence is m * (1 + a) / 2: a cell under an untaught label keeps at most half of
   its margin, so the **share of the image under untaught labels** lowers the image's confidence.
   A cell no label took (unlabeled, not taught as such) has confidence 0: nothing vouches for it.

A region's confidence is the mean over its cells, the image's the mean over all cells. So sorting by
it, lowest first, puts first the images whose correction teaches the memory most.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from backend.pipeline.labelling import ClusterLabel


@dataclass(frozen=True)
class Confidence:
    """Per assigned region (in the assignment's order) and for the whole image, each in [0, 1]."""

    regions: tuple[float, ...]
    image: float

    @classmethod
    def of_cells(cls, cells: np.ndarray, region_cells: Sequence[np.ndarray]) -> Confidence:
        """From (N,) cell confidences and each region's (N,) boolean cells."""
        regions = tuple(float(cells[chosen].mean()) if chosen.any() else 0.0 for chosen in region_cells)
        return cls(regions, float(cells.mean()) if len(cells) else 0.0)


def cell_confidence(scores: np.ndarray, chosen: np.ndarray, agreement: np.ndarray, taught: np.ndarray) -> np.ndarray:
    """(N,) m * (1 + a) / 2 of the module's docstring; ``scores`` (N, M), the rest (N,), ``chosen`` indexes M."""
    cells = np.arange(len(chosen))
    own = scores[cells, chosen]
    others = scores.copy()
    others[cells, chosen] = -np.inf
    second = others.max(axis=1) if scores.shape[1] > 1 else np.zeros(len(chosen))
    margin = np.clip(own - second, 0.0, 1.0)
    return (margin * (1 + np.where(taught, np.clip(agreement, 0.0, 1.0), 0.0)) / 2).astype(np.float32)


def clip_confidence(cluster_grid: np.ndarray, clip_scores: np.ndarray, assigned: Sequence[ClusterLabel]) -> Confidence:
    """The confidence of the paper's labelling (no memory): CLIP's margins, every label untaught.

    ``clip_scores`` are CLIP's (K, L) probabilities of the clusters of ``cluster_grid``.
    """
    clusters = cluster_grid.ravel()
    label_of = np.full(len(clip_scores), -1, np.int64)
    for assignment in assigned:
        label_of[assignment.cluster] = assignment.label
    chosen = label_of[clusters]
    labelled = chosen >= 0
    cells = np.zeros(len(clusters), np.float32)
    if labelled.any():
        untaught = np.zeros(int(labelled.sum()), bool)
        cells[labelled] = cell_confidence(clip_scores[clusters[labelled]], chosen[labelled], untaught, untaught)
    return Confidence.of_cells(cells, [clusters == assignment.cluster for assignment in assigned])
