"""Labelling with a project's memory: CLIP's scores combined with the taught exemplars.

1. A cell's exemplar probability q of label l is the share of l's exemplars among the cell's
   ``NEIGHBOURS`` most cosine-similar exemplars of all taught labels (``UNLABELED`` among them),
   each vote weighted by its similarity (at least 0): a cell unlike every exemplar gets q near 0.
2. A cell's score for label l is (1 - w) * CLIP + w * q, with w = n / (n + ``HALF_WEIGHT_REGIONS``)
   for the n regions taught of l (0 for an untaught label); CLIP's score is its cluster's.
3. Taught labels are candidates whatever the caption says, and may take several clusters;
   untaught candidates keep the paper's rule (only their best cluster). A cluster takes the
   label of best mean score over its cells; ``UNLABELED`` or no score leaves it unlabeled.
4. A cell whose q for some label reaches ``CONFIDENT`` takes that label instead of its cluster's
   when its score (rule 2, the same weight) for it is higher: a class K-means merged with its
   neighbour is split again, but one taught region (w = 1/2, a score of at most 1/2 + CLIP's
   1/2 * (1 - c)) cannot outvote a label CLIP gives c >= 2/3 that the memory knows nothing of.
   A label of CLIP's that is taught too weighs its own exemplars: where they say "not here",
   two regions of evidence (one of each label) outvote CLIP's certainty.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from backend.pipeline.confidence import Confidence, cell_confidence
from backend.pipeline.labelling import ClusterLabel, cluster_masks
from backend.pipeline.memory import UNLABELED, Memory
from backend.pipeline.vocabulary import Label

NEIGHBOURS = 10  # exemplars that vote on a cell's label: a few mislabelled ones are outvoted
HALF_WEIGHT_REGIONS = 1  # regions taught at which the exemplars weigh as much as CLIP: one
CONFIDENT = 0.9  # exemplar probability at which a cell follows the exemplars, not its cluster


@dataclass(frozen=True)
class Exemplars:
    """The memory as prediction uses it: every taught vector in one matrix, made once per memory revision.

    One matrix, so that a prediction multiplies it as it is, without gathering the memory again.
    """

    matrix: np.ndarray  # (N, C) float32 unit rows
    owners: np.ndarray  # (N,) int64: the index in ``names`` of each row's label
    names: tuple[str, ...]  # the taught labels (UNLABELED among them)
    regions: dict[str, int]  # label -> regions taught

    @classmethod
    def of(cls, vectors: dict[str, np.ndarray], regions: dict[str, int]) -> Exemplars:
        """Exemplars of per-label (N_l, C) vectors (normalised here)."""
        names = tuple(name for name, rows in vectors.items() if len(rows))
        parts = [np.asarray(vectors[name], np.float32) for name in names]
        matrix = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
        owners = np.repeat(np.arange(len(names)), [len(part) for part in parts])
        return cls(_unit_rows(matrix), owners, names, regions)

    @classmethod
    def from_memory(cls, memory: Memory) -> Exemplars:
        """Every prototype and cell of the memory, written once into a float32 matrix (no per-label copies)."""
        names = tuple(memory.labels)
        index = {name: position for position, name in enumerate(names)}
        arrays = [(index[label], array) for taught in memory.annotations.values() for label, examples in taught.items()
                  for array in (examples.prototypes, examples.cells) if len(array)]
        matrix = np.empty((sum(len(array) for _, array in arrays), memory.channels), np.float32)
        owners = np.empty(len(matrix), np.int64)
        row = 0
        for owner, array in arrays:
            matrix[row : row + len(array)] = array
            owners[row : row + len(array)] = owner
            row += len(array)
        return cls(_unit_rows(matrix), owners, names, {label: memory.regions_taught(label) for label in names})

    @property
    def nbytes(self) -> int:
        return self.matrix.nbytes + self.owners.nbytes

    def taught(self, labels: Sequence[Label]) -> list[int]:
        """Indices of ``labels`` that have exemplars."""
        return [index for index, label in enumerate(labels) if label.name in self.names]

    def weight(self, label: str) -> float:
        """How much the exemplars of ``label`` count against CLIP: grows with the regions taught."""
        count = self.regions.get(label, 0)
        return count / (count + HALF_WEIGHT_REGIONS)


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    """``matrix`` with each row divided by its norm, in place."""
    matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    return matrix


def exemplar_probabilities(features: np.ndarray, exemplars: Exemplars, names: Sequence[str],
                           device: torch.device | str = "cpu") -> np.ndarray:
    """(G*G, len(names)) similarity-weighted share of each of ``names`` among each cell's nearest exemplars.

    Exemplars of labels not in ``names`` (gone from the label config) take no part.
    """
    channels = features.shape[0]
    cells = features.reshape(channels, -1).T
    column = {name: position for position, name in enumerate(names)}
    row_columns = np.array([column.get(name, -1) for name in exemplars.names], np.int64)[exemplars.owners]
    usable = int((row_columns >= 0).sum())
    if not usable:
        return np.zeros((len(cells), len(names)), np.float32)
    vectors = torch.from_numpy(exemplars.matrix).to(device)
    owner = torch.from_numpy(row_columns).to(device)
    cells = torch.nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(cells, np.float32)).to(device), dim=1)
    similarity = cells @ vectors.T  # (N cells, rows)
    similarity[:, owner < 0] = -torch.inf
    similarity, nearest = similarity.topk(min(NEIGHBOURS, usable), dim=1)  # (N, k)
    votes = torch.zeros((len(cells), len(names)), device=device)
    votes.scatter_add_(1, owner[nearest], similarity.clamp_min(0))
    return (votes / nearest.shape[1]).cpu().numpy()


def label_with_exemplars(
    features: np.ndarray, cluster_grid: np.ndarray, clip_scores: np.ndarray, candidates: Sequence[int],
    labels: Sequence[Label], exemplars: Exemplars, height: int, width: int, device: torch.device | str = "cpu",
) -> tuple[np.ndarray, list[ClusterLabel], Confidence]:
    """(M, H, W) masks, one per label given, the label of each (rules of this module's docstring), their confidence.

    ``clip_scores`` are CLIP's (K, L) probabilities of the clusters of ``cluster_grid``; ``candidates``
    already include the taught labels. A mask's ``ClusterLabel.cluster`` is its index in the masks.
    """
    names = [label.name for label in labels] + [UNLABELED]
    unlabeled = len(labels)
    clusters = cluster_grid.ravel()
    q = exemplar_probabilities(features, exemplars, names, device)  # (N, L + 1)
    weights = np.array([exemplars.weight(name) for name in names], np.float32)
    clip = np.concatenate([clip_scores, np.zeros((len(clip_scores), 1), np.float32)], axis=1)[clusters]
    scores = (1 - weights) * clip + weights * q  # (N, L + 1)
    allowed = np.zeros(len(names), bool)
    allowed[list(candidates)] = True
    allowed[unlabeled] = True
    cluster_scores = np.stack([scores[clusters == k].mean(axis=0) for k in range(len(clip_scores))])
    cluster_scores[:, ~allowed] = 0
    for label in candidates:
        if weights[label] == 0:  # untaught: only its best cluster, as in the paper
            best = int(cluster_scores[:, label].argmax())
            cluster_scores[np.arange(len(cluster_scores)) != best, label] = 0
    cluster_choice = np.where(cluster_scores.max(axis=1) > 0, cluster_scores.argmax(axis=1), unlabeled)
    cell_labels = cluster_choice[clusters]
    cells = np.arange(len(cell_labels))
    exemplar_choice = q.argmax(axis=1)
    confident = ((q[cells, exemplar_choice] >= CONFIDENT) & allowed[exemplar_choice]
                 & (scores[cells, exemplar_choice] > scores[cells, cell_labels]))
    cell_labels = np.where(confident, exemplar_choice, cell_labels)
    present = [int(label) for label in np.unique(cell_labels) if label != unlabeled]
    grid = np.full(cluster_grid.shape, len(present), np.int64)  # index len(present): no mask
    assigned, region_cells = [], []
    for index, label in enumerate(present):
        chosen = cell_labels == label
        grid.ravel()[chosen] = index
        region_cells.append(chosen)
        assigned.append(ClusterLabel(cluster=index, label=label, score=float(scores[chosen, label].mean())))
    confidence = Confidence.of_cells(
        cell_confidence(scores, cell_labels, q[cells, cell_labels], weights[cell_labels] > 0), region_cells)
    return cluster_masks(grid, height, width)[: len(present)], assigned, confidence
