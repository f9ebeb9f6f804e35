import numpy as np

from backend.pipeline.labelling import assign_labels, cluster_masks, masked_images


def test_assign_labels_follows_the_paper_rules():
    scores = np.array([
        [0.70, 0.20, 0.10],  # cluster 0: best for label 0
        [0.60, 0.30, 0.10],  # cluster 1: label 0 prefers cluster 0, so it takes label 1
        [0.10, 0.10, 0.80],  # cluster 2: label 2 is no candidate -> unlabeled
        [0.50, 0.25, 0.25],  # cluster 3: label 1's best is cluster 1 -> nothing left
    ])
    assigned = assign_labels(scores, candidates=[0, 1])
    assert [(a.cluster, a.label) for a in assigned] == [(0, 0), (1, 1)]
    assert assigned[1].score == 0.30


def test_assign_labels_without_candidates_labels_nothing():
    assert assign_labels(np.full((4, 3), 1 / 3), candidates=[]) == []


def test_cluster_masks_upsample_with_nearest_neighbours():
    grid = np.array([[0, 1], [2, 2]])
    masks = cluster_masks(grid, height=4, width=6)
    assert masks.shape == (3, 4, 6) and masks.dtype == bool
    assert masks[0, :2, :3].all() and masks[1, :2, 3:].all() and masks[2, 2:].all()
    assert (masks.sum(axis=0) == 1).all()


def test_masked_images_black_out_everything_else():
    image = np.full((4, 4, 3), 200, dtype=np.uint8)
    mask = np.zeros((1, 4, 4), dtype=bool)
    mask[0, 1, 1] = True
    (masked,) = masked_images(image, mask)
    assert masked[1, 1].tolist() == [200, 200, 200]
    assert masked.sum() == 600
