"""Stage 4: class-agnostic masks by K-means on the U-Net feature grid.

The released code used scikit-learn's defaults (k-means++, 10 initialisations,
unseeded). This is the same algorithm in torch, seeded, with all initialisations run at
once as a batch, so it runs on the GPU when there is one. Features are not normalised,
as in the released code.
"""

from __future__ import annotations

import numpy as np
import torch

N_INIT = 10
MAX_ITER = 100
TOLERANCE = 1e-4  # relative to the mean feature variance, as scikit-learn's tol


def _squared_distances(points: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """(inits, N, K) squared Euclidean distances from (N, D) points to (inits, K, D) centers."""
    cross = torch.einsum("nd,ikd->ink", points, centers)
    return ((points * points).sum(-1)[None, :, None] - 2 * cross + (centers * centers).sum(-1)[:, None, :]).clamp_min(0)


def _kmeans_plus_plus(points: torch.Tensor, k: int, n_init: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding for ``n_init`` independent runs at once."""
    n = points.shape[0]
    first = torch.randint(n, (n_init,), generator=generator, device="cpu").to(points.device)
    centers = points[first][:, None, :]
    closest = _squared_distances(points, centers)[..., 0]
    for _ in range(1, k):
        weights = closest / closest.sum(dim=1, keepdim=True).clamp_min(1e-12)
        uniform = torch.ones_like(weights) / n
        weights = torch.where(closest.sum(dim=1, keepdim=True) > 0, weights, uniform)
        chosen = torch.multinomial(weights.cpu(), 1, generator=generator)[:, 0].to(points.device)
        new = points[chosen][:, None, :]
        centers = torch.cat([centers, new], dim=1)
        closest = torch.minimum(closest, _squared_distances(points, new)[..., 0])
    return centers


def kmeans(points: torch.Tensor, k: int, seed: int, n_init: int = N_INIT, max_iter: int = MAX_ITER) -> torch.Tensor:
    """Cluster index of each of the (N, D) points, from the best of ``n_init`` seeded runs."""
    points = points.float()
    k = min(k, points.shape[0])
    generator = torch.Generator(device="cpu").manual_seed(seed)
    centers = _kmeans_plus_plus(points, k, n_init, generator)
    tolerance = TOLERANCE * points.var(dim=0).mean()
    one_hot_range = torch.arange(k, device=points.device)
    for _ in range(max_iter):
        assignment = _squared_distances(points, centers).argmin(dim=2)  # (inits, N)
        members = (assignment[..., None] == one_hot_range).float()  # (inits, N, K)
        counts = members.sum(dim=1)[..., None]
        sums = torch.einsum("ink,nd->ikd", members, points)
        updated = torch.where(counts > 0, sums / counts.clamp_min(1), centers)  # empty cluster keeps its center
        shift = ((updated - centers) ** 2).sum(dim=(1, 2))
        centers = updated
        if bool((shift <= tolerance).all()):
            break
    distances = _squared_distances(points, centers)
    inertia = distances.min(dim=2).values.sum(dim=1)
    best = int(inertia.argmin())
    return distances[best].argmin(dim=1)


def canonical_order(assignment: np.ndarray) -> np.ndarray:
    """Renumber clusters 0, 1, ... by their first pixel in raster order, so results are stable."""
    _, first = np.unique(assignment, return_index=True)
    order = np.argsort(np.argsort(first))
    values = np.unique(assignment)
    lookup = np.zeros(values.max() + 1, dtype=np.int64)
    lookup[values] = order
    return lookup[assignment]


def cluster_feature_grid(features: np.ndarray, k: int, seed: int, device: torch.device | str = "cpu") -> np.ndarray:
    """A (G, G) cluster map from a (C, G, G) feature grid."""
    channels, height, width = features.shape
    points = torch.from_numpy(np.ascontiguousarray(features.reshape(channels, -1).T)).to(device)
    assignment = kmeans(points, k, seed).cpu().numpy()
    return canonical_order(assignment).reshape(height, width)
