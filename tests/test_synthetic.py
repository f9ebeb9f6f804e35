"""Synthetic labelled scenes and the labelled-folder dataset that reads them."""

import numpy as np
import pytest

from backend.cli import main
from backend.evaluation.datasets import dataset_at, folder_dataset
from backend.evaluation.synthetic import CLASSES
from backend.images import read_image_file


def test_scenes_are_deterministic_and_read_back_as_a_folder_dataset(tmp_path):
    assert main(["synthetic-scenes", "--out", str(tmp_path / "a"), "--count", "3", "--seed", "5"]) == 0
    assert main(["synthetic-scenes", "--out", str(tmp_path / "b"), "--count", "3", "--seed", "5"]) == 0
    first, second = (list(dataset_at("folder", tmp_path / name).samples(tmp_path / name)) for name in "ab")
    assert [s.image_id for s in first] == ["scene-0000", "scene-0001", "scene-0002"]
    assert folder_dataset(tmp_path / "a").class_names == list(CLASSES)
    for one, other in zip(first, second):
        np.testing.assert_array_equal(one.label, other.label)
        np.testing.assert_array_equal(read_image_file(one.image_path), read_image_file(other.image_path))
        assert len(np.unique(one.label)) >= 2 and one.label.max() < len(CLASSES)


def test_a_folder_without_classes_is_refused_with_what_it_needs(tmp_path):
    with pytest.raises(FileNotFoundError, match="classes.txt"):
        folder_dataset(tmp_path)
    (tmp_path / "classes.txt").write_text("background\n")
    with pytest.raises(ValueError, match="at least one label"):
        folder_dataset(tmp_path)
