"""Readers of the benchmark datasets in their usual local layouts.

Every reader yields ``Sample(image_id, image_path, label)`` lazily (one label PNG read per
sample), in a fixed order, at most ``limit`` of them. ``label`` is an (H, W) uint8 array of
class ids, 255 where the ground truth is ignored. Class 0 is background in every dataset, and
the label list given to the segmenter is the other classes in id order, so a prediction PNG
value ``i`` (0 unlabeled, ``i`` the ``i``-th label) is class ``i`` without any remapping.

Pascal VOC 2012 (``voc``, 21 classes: background and the 20 VOC classes)::

    ROOT/ImageSets/Segmentation/val.txt     one image id per line (1,449 ids in VOC 2012 val)
    ROOT/JPEGImages/<id>.jpg                the image
    ROOT/SegmentationClass/<id>.png         palette PNG; the palette INDEX of a pixel is its class
                                            id (0 background, 1..20), 255 the void border

ROOT is the ``VOC2012`` folder of the official archive (``VOCdevkit/VOC2012``).

COCO-Object (``coco-object``, 81 classes: background and the 80 COCO object classes), the layout
training-free segmentation works evaluate on (COCO val2017 object masks)::

    ROOT/images/<id>.jpg                    the image
    ROOT/annotations/<id>.png               single-channel 8-bit PNG (mode L or P): 0 background,
                                            1..80 the 80 object classes in COCO's category-id
                                            order with the unused ids skipped (1 person,
                                            2 bicycle, ..., 80 toothbrush), 255 ignored

The images scored are every ``<id>.png`` in ``ROOT/annotations``, sorted by id. GroupViT's
converter (used by TCL and others) writes the same labels as ``annotations/val2017/<id>_instanceTrainIds.png``
next to ``images/val2017/<id>.jpg``: link or rename them into this layout.

COCO-27 (``coco27``): the same files as COCO-Object, each object class mapped to its COCO
supercategory. COCO-Stuff-27 as STEGO and ACSeg use it has 27 classes: 12 "things"
supercategories and 15 "stuff" supercategories. The COCO-Object PNGs hold only the 80 things
(all stuff is background 0), so the 15 stuff supercategories CANNOT be scored from this layout:
COCO-27 here scores 13 classes, background plus the 12 thing supercategories (person, vehicle,
outdoor, animal, accessory, sports, kitchen, food, furniture, electronic, appliance, indoor).
Its mIoU is therefore not comparable with a COCO-Stuff-27 figure such as the paper's 34.03.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from backend.evaluation.scores import IGNORE_INDEX


class Sample(NamedTuple):
    """One ground-truth image: its id, where its image is, and its class-id label map."""

    image_id: str
    image_path: Path
    label: np.ndarray


@dataclass(frozen=True)
class ClassInfo:
    """A class as the dataset spells it (``name``, the key of scores) and as the segmenter is asked."""

    name: str
    prompt_name: str


@dataclass(frozen=True)
class Dataset:
    """A dataset's classes (in id order, 0 background) and where its files lie under ROOT.

    ``stored_to_class`` maps the values stored in the label PNGs to class ids when they differ
    (COCO-27 reads COCO-Object PNGs); ``id_list`` is the file listing the ids, or None to score
    every PNG in ``label_dir``.
    """

    key: str
    classes: tuple[ClassInfo, ...]
    image_dir: str
    label_dir: str
    id_list: str | None = None
    stored_to_class: tuple[int, ...] | None = None
    image_suffixes: tuple[str, ...] = (".jpg",)  # the first that exists is the image
    release_void_as_background: bool = False  # the released code read the ignored pixels as class 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [info.name for info in self.classes]

    @property
    def label_names(self) -> list[str]:
        """The labels to segment with, in order: prediction value i is class i (0 background)."""
        return [info.prompt_name for info in self.classes[1:]]

    def samples(self, root: Path, limit: int | None = None) -> Iterator[Sample]:
        """The first ``limit`` samples (all when None); the id list is read now, labels lazily."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be at least 0, got {limit}")
        ids = self._ids(Path(root))
        return (self._sample(Path(root), image_id) for image_id in itertools.islice(ids, limit))

    def _ids(self, root: Path) -> list[str]:
        if self.id_list is not None:
            lines = (root / self.id_list).read_text().splitlines()
            return [line.strip() for line in lines if line.strip()]
        ids = sorted(path.stem for path in (root / self.label_dir).glob("*.png"))
        if not ids:
            raise FileNotFoundError(f"no label PNGs in {root / self.label_dir}")
        return ids

    def _sample(self, root: Path, image_id: str) -> Sample:
        candidates = [root / self.image_dir / f"{image_id}{suffix}" for suffix in self.image_suffixes]
        image_path = next((path for path in candidates if path.is_file()), candidates[0])
        return Sample(image_id, image_path, self._read_label(root / self.label_dir / f"{image_id}.png"))

    def _read_label(self, path: Path) -> np.ndarray:
        """Class ids of a label PNG; a palette PNG gives its indices, never its colours."""
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise ValueError(f"{path}: expected a palette or greyscale PNG of class ids, got mode {image.mode}")
            stored = np.array(image)
        num_stored = self.num_classes if self.stored_to_class is None else len(self.stored_to_class)
        valid = (stored < num_stored) | (stored == IGNORE_INDEX)
        if not valid.all():
            bad = int(stored[~valid][0])
            raise ValueError(f"{path}: label {bad} is neither a class 0..{num_stored - 1} nor {IGNORE_INDEX}")
        if self.stored_to_class is None:
            return stored
        table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        table[:num_stored] = self.stored_to_class
        return table[stored]


VOC_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# VOC joins some words; the segmenter's caption and CLIP prompts need them apart.
_VOC_PROMPTS = {"diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv monitor"}

# The 80 COCO object classes in category-id order, grouped by supercategory; the supercategories
# appear in their own id order, and each one's classes are contiguous in the 80.
COCO_THINGS_BY_SUPERCATEGORY: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("person", ("person",)),
    ("vehicle", ("bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat")),
    ("outdoor", ("traffic light", "fire hydrant", "stop sign", "parking meter", "bench")),
    ("animal", ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe")),
    ("accessory", ("backpack", "umbrella", "handbag", "tie", "suitcase")),
    ("sports", ("frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
                "skateboard", "surfboard", "tennis racket")),
    ("kitchen", ("bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl")),
    ("food", ("banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake")),
    ("furniture", ("chair", "couch", "potted plant", "bed", "dining table", "toilet")),
    ("electronic", ("tv", "laptop", "mouse", "remote", "keyboard", "cell phone")),
    ("appliance", ("microwave", "oven", "toaster", "sink", "refrigerator")),
    ("indoor", ("book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")),
)
COCO_OBJECT_NAMES = ("background",) + tuple(
    name for _, things in COCO_THINGS_BY_SUPERCATEGORY for name in things
)
COCO27_NAMES = ("background",) + tuple(supercategory for supercategory, _ in COCO_THINGS_BY_SUPERCATEGORY)
# COCO-Object label value -> COCO-27 class id (0 background stays 0).
COCO_OBJECT_TO_COCO27 = (0,) + tuple(
    index for index, (_, things) in enumerate(COCO_THINGS_BY_SUPERCATEGORY, start=1) for _ in things
)


def _same_prompts(names: tuple[str, ...]) -> tuple[ClassInfo, ...]:
    return tuple(ClassInfo(name, name) for name in names)


DATASETS: dict[str, Dataset] = {
    "voc": Dataset(
        key="voc",
        classes=tuple(ClassInfo(name, _VOC_PROMPTS.get(name, name)) for name in VOC_NAMES),
        image_dir="JPEGImages",
        label_dir="SegmentationClass",
        id_list="ImageSets/Segmentation/val.txt",
        release_void_as_background=True,  # its colour-map reader mapped the void border's colour to 0
    ),
    "coco-object": Dataset(
        key="coco-object", classes=_same_prompts(COCO_OBJECT_NAMES), image_dir="images", label_dir="annotations"
    ),
    "coco27": Dataset(
        key="coco27",
        classes=_same_prompts(COCO27_NAMES),
        image_dir="images",
        label_dir="annotations",
        stored_to_class=COCO_OBJECT_TO_COCO27,
    ),
}


def folder_dataset(root: Path) -> Dataset:
    """A labelled folder (``--dataset folder``): ``classes.txt`` (one name per line, class 0 first,
    the background), ``images/<id>.png`` or ``.jpg``, ``labels/<id>.png`` (class ids, 255 ignored)."""
    path = Path(root) / "classes.txt"
    if not path.is_file():
        raise FileNotFoundError(f"a labelled folder needs {path}: one class name per line, background first")
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if len(names) < 2:
        raise ValueError(f"{path} names {len(names)} classes; it needs the background and at least one label")
    return Dataset(key="folder", classes=_same_prompts(names), image_dir="images", label_dir="labels",
                   image_suffixes=(".png", ".jpg", ".jpeg"))


def dataset_at(key: str, root: Path) -> Dataset:
    """The dataset called ``key``, or for ``folder`` the labelled folder at ``root``."""
    return folder_dataset(root) if key == "folder" else get_dataset(key)


def get_dataset(key: str) -> Dataset:
    """The dataset called ``key``; an unknown key names the known ones."""
    try:
        return DATASETS[key]
    except KeyError:
        raise ValueError(f"unknown dataset {key!r}; known: {', '.join(DATASETS)}") from None
