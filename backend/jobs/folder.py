"""Bootstrap a dataset from a folder of images, without Label Studio.

Every image below a folder is segmented once, and three things are written:
``tasks.json`` (a Label Studio import file with a prediction per task),
``coco.json`` (COCO instances with uncompressed RLE masks) and ``masks/`` (the
label-index PNG of each image, mirroring the folder's layout).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
from tqdm import tqdm

from backend.images import ImageError, ImageLimits, read_image_file
from backend.labelstudio.results import brush_results, prediction
from backend.overlay import label_index_image
from backend.pipeline.segmenter import Segmentation, Segmenter, SegmentOptions
from backend.pipeline.vocabulary import Label

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
LOCAL_FILES_PREFIX = "/data/local-files/?d="


@dataclass(frozen=True)
class FolderSummary:
    done: int
    failed: list[tuple[str, str]]  # (path relative to the folder, one-line reason)
    seconds: float


def local_files_reference(document_root: Path) -> Callable[[Path], str]:
    """References for Label Studio's local files storage (``LOCAL_FILES_DOCUMENT_ROOT``)."""
    root = Path(document_root).resolve()

    def reference(path: Path) -> str:
        resolved = Path(path).resolve()
        try:
            relative = resolved.relative_to(root)
        except ValueError:
            raise ValueError(f"{path} is outside the local files document root {root}") from None
        return LOCAL_FILES_PREFIX + quote(relative.as_posix(), safe="/")

    return reference


def url_prefix_reference(prefix: str, folder: Path) -> Callable[[Path], str]:
    """References ``prefix`` + the image's path relative to ``folder``, URL-quoted."""
    root = Path(folder).resolve()

    def reference(path: Path) -> str:
        relative = Path(path).resolve().relative_to(root)
        return prefix + quote(relative.as_posix(), safe="/")

    return reference


def find_images(folder: Path, exclude: Path | None = None) -> list[Path]:
    """The image files below ``folder``, sorted by relative path; nothing under ``exclude``."""
    folder = Path(folder)
    excluded = Path(exclude).resolve() if exclude is not None else None
    found = []
    for path in folder.rglob("*"):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if excluded is not None and path.resolve().is_relative_to(excluded):
            continue
        found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def coco_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a boolean (H, W) mask: column-major runs, zeros first."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return {"counts": [], "size": [int(mask.shape[0]), int(mask.shape[1])]}
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], changes, [flat.size])))
    counts = ([0] if flat[0] else []) + [int(r) for r in runs]
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def mask_bbox(mask: np.ndarray) -> list[int]:
    """[x, y, width, height] of the mask's set pixels."""
    rows = np.flatnonzero(mask.any(axis=1))
    columns = np.flatnonzero(mask.any(axis=0))
    return [int(columns[0]), int(rows[0]), int(columns[-1] - columns[0] + 1), int(rows[-1] - rows[0] + 1)]


def coco_annotations(segmentation: Segmentation, image_id: int, first_id: int) -> list[dict]:
    """One COCO annotation per labelled region that still has pixels in the label map."""
    annotations = []
    for region in segmentation.regions:
        mask = segmentation.label_map == region.label + 1
        area = int(mask.sum())
        if area == 0:
            continue
        annotations.append({
            "id": first_id + len(annotations),
            "image_id": image_id,
            "category_id": region.label + 1,
            "segmentation": coco_rle(mask),
            "area": area,
            "bbox": mask_bbox(mask),
            "iscrowd": 0,
            "score": round(region.score, 4),
        })
    return annotations


def _write_json_atomically(path: Path, value: object) -> None:
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            json.dump(value, file, ensure_ascii=False)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def annotate_folder(
    folder: Path,
    labels: Sequence[Label],
    out: Path,
    segmenter: Segmenter,
    options: SegmentOptions,
    model_version: str,
    image_reference: Callable[[Path], str],
    from_name: str = "label",
    to_name: str = "image",
    batch: int = 4,
    limits: ImageLimits = ImageLimits(),  # noqa: B008 (frozen, so a shared default is safe)
    progress: bool = True,
) -> FolderSummary:
    """Segment every image below ``folder``; write tasks.json, coco.json and masks/ under ``out``."""
    if not labels:
        raise ValueError("annotate_folder() needs at least one label")
    if batch < 1:
        raise ValueError("batch must be at least 1")
    start = time.perf_counter()
    folder, out = Path(folder), Path(out)
    paths = find_images(folder, exclude=out)
    # All references first: a path the reference refuses stops the job before any model runs.
    references = [image_reference(path) for path in paths]
    out.mkdir(parents=True, exist_ok=True)

    tasks: list[dict] = []
    coco_images: list[dict] = []
    coco_annotation_list: list[dict] = []
    failed: list[tuple[str, str]] = []
    bar = tqdm(total=len(paths), desc="annotate", unit="image", file=sys.stderr,
               disable=not progress or len(paths) < 2)
    try:
        for first in range(0, len(paths), batch):
            readable = []
            for path, reference in zip(paths[first:first + batch], references[first:first + batch]):
                relative = path.relative_to(folder).as_posix()
                try:
                    readable.append((relative, reference, read_image_file(path, limits)))
                except ImageError as error:
                    failed.append((relative, " ".join(str(error).split())))
                    bar.update(1)
            if not readable:
                continue
            encodings = segmenter.encode_batch([image for _, _, image in readable])
            for (relative, reference, image), encoding in zip(readable, encodings):
                segmentation = segmenter.segment(encoding, image, labels, options)
                results = brush_results(segmentation, from_name, to_name)
                tasks.append({"data": {"image": reference},
                              "predictions": [prediction(results, segmentation.score, model_version)]})
                image_id = len(coco_images) + 1
                height, width = segmentation.label_map.shape
                coco_images.append({"id": image_id, "file_name": relative, "width": int(width), "height": int(height)})
                coco_annotation_list.extend(
                    coco_annotations(segmentation, image_id, first_id=len(coco_annotation_list) + 1))
                mask_path = (out / "masks" / relative).with_suffix(".png")
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                label_index_image(segmentation.label_map).save(mask_path)
                bar.update(1)
    finally:
        bar.close()

    coco = {
        "images": coco_images,
        "categories": [{"id": i, "name": label.name} for i, label in enumerate(labels, start=1)],
        "annotations": coco_annotation_list,
    }
    _write_json_atomically(out / "tasks.json", tasks)
    _write_json_atomically(out / "coco.json", coco)
    return FolderSummary(done=len(tasks), failed=failed, seconds=time.perf_counter() - start)
