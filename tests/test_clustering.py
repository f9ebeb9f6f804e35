import numpy as np
import torch

from backend.pipeline.clustering import canonical_order, cluster_feature_grid, kmeans


def _blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=10.0, size=(4, 64))
    truth = rng.integers(0, 4, size=600)
    return centers[truth] + rng.normal(scale=0.5, size=(600, 64)), truth


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_kmeans_recovers_separated_clusters():
    points, truth = _blobs()
    found = kmeans(torch.from_numpy(points), k=4, seed=0).numpy()
    assert _same_partition(found, truth)


def test_kmeans_is_deterministic_for_a_seed():
    points, _ = _blobs(1)
    noisy = points + np.random.default_rng(2).normal(scale=8.0, size=points.shape)  # overlapping clusters
    first = kmeans(torch.from_numpy(noisy), k=5, seed=3).numpy()
    again = kmeans(torch.from_numpy(noisy), k=5, seed=3).numpy()
    np.testing.assert_array_equal(first, again)


def test_kmeans_with_more_clusters_than_points_uses_each_point():
    points = torch.tensor([[0.0, 0.0], [5.0, 5.0], [10.0, 0.0]])
    assert sorted(kmeans(points, k=8, seed=0).tolist()) == [0, 1, 2]


def test_canonical_order_numbers_clusters_by_first_appearance():
    np.testing.assert_array_equal(canonical_order(np.array([3, 3, 1, 0, 1, 3])), [0, 0, 1, 2, 1, 0])


def test_cluster_feature_grid_shape_and_layout():
    features = np.zeros((8, 16, 16), dtype=np.float16)
    features[0, :, 8:] = 5.0  # right half differs
    grid = cluster_feature_grid(features, k=2, seed=0)
    assert grid.shape == (16, 16)
    assert (grid[:, :8] == 0).all() and (grid[:, 8:] == 1).all()
