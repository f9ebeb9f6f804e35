"""Bootstrap a dataset from a folder of images, without Label Studio.

Every image below a folder is segmented once, and three things are written:
``tasks.json`` (a Label Studio import file with a prediction per task),
``coco.json`` (COCO instances with uncompressed RLE masks) and ``masks/`` (the
label-index PNG of each image, mirroring the folder's layout). The same files come
from this process (``annotate_folder``) or from RQ workers (``annotate_folder_queued``):
both segment with ``segment_folder_images`` and write with ``write_dataset``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np

from backend.images import ImageError, ImageLimits, read_image_file
from backend.jobs.ledger import MemoryLedger, Outcome, RedisLedger, RunProgress
from backend.jobs.progress import RunBar
from backend.jobs.queue import chunk_context, enqueue_chunks, job_queue, redis_connection, wait_for_run
from backend.labelstudio.results import brush_results, prediction
from backend.overlay import label_index_image
from backend.pipeline.segmenter import Segmentation, Segmenter, SegmentOptions
from backend.pipeline.vocabulary import Label
from backend.settings import Settings

log = logging.getLogger(__name__)

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


def coco_annotations(segmentation: Segmentation) -> list[dict]:
    """One COCO annotation per labelled region that still has pixels, without ``id`` and ``image_id`` yet."""
    annotations = []
    for region in segmentation.regions:
        mask = segmentation.label_map == region.label + 1
        area = int(mask.sum())
        if area == 0:
            continue
        annotations.append({
            "category_id": region.label + 1,
            "segmentation": coco_rle(mask),
            "area": area,
            "bbox": mask_bbox(mask),
            "iscrowd": 0,
            "score": round(region.score, 4),
        })
    return annotations


@dataclass(frozen=True)
class ImageRecord:
    """One segmented image: its prediction, size and COCO annotations; JSON, so that workers can hand it over."""

    relative: str  # path below the folder, with forward slashes
    prediction: dict
    width: int
    height: int
    annotations: list[dict]


def _write_json_atomically(path: Path, value: object) -> None:
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            json.dump(value, file, ensure_ascii=False)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def segment_folder_images(
    folder: Path, relatives: Sequence[str], labels: Sequence[Label], out: Path, segmenter: Segmenter,
    options: SegmentOptions, model_version: str, from_name: str, to_name: str, batch: int, limits: ImageLimits,
) -> Iterator[tuple[str, ImageRecord | str]]:
    """Segment the images ``batch`` at a time (a batch refined while the next is encoded) and write each
    label-index PNG under ``out/masks``; yields each image's path and its record, or the one-line reason it failed."""
    unreadable: list[tuple[str, str]] = []  # filled as batches are read, emptied as results come out

    def readable_batches() -> Iterator[tuple[list[str], list[np.ndarray]]]:
        for first in range(0, len(relatives), batch):
            readable = []
            for relative in relatives[first:first + batch]:
                try:
                    readable.append((relative, read_image_file(Path(folder) / relative, limits)))
                except ImageError as error:
                    unreadable.append((relative, " ".join(str(error).split())))
            if readable:
                yield [relative for relative, _ in readable], [image for _, image in readable]

    for names, segmentations in segmenter.segment_batches(readable_batches(), labels, options):
        yield from unreadable
        unreadable.clear()
        for relative, segmentation in zip(names, segmentations):
            results = brush_results(segmentation, from_name, to_name)
            height, width = segmentation.label_map.shape
            mask_path = (Path(out) / "masks" / relative).with_suffix(".png")
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            label_index_image(segmentation.label_map).save(mask_path)
            yield relative, ImageRecord(relative, prediction(results, segmentation.score, model_version),
                                        int(width), int(height), coco_annotations(segmentation))
    yield from unreadable


def write_dataset(out: Path, labels: Sequence[Label], records: Sequence[ImageRecord],
                  references: dict[str, str]) -> None:
    """``tasks.json`` and ``coco.json`` from the records, in their order, numbering COCO images and annotations."""
    tasks, images, annotations = [], [], []
    for image_id, record in enumerate(records, start=1):
        tasks.append({"data": {"image": references[record.relative]}, "predictions": [record.prediction]})
        images.append({"id": image_id, "file_name": record.relative, "width": record.width, "height": record.height})
        annotations += [{"id": len(annotations) + 1 + index, "image_id": image_id, **annotation}
                        for index, annotation in enumerate(record.annotations)]
    coco = {
        "images": images,
        "categories": [{"id": i, "name": label.name} for i, label in enumerate(labels, start=1)],
        "annotations": annotations,
    }
    _write_json_atomically(Path(out) / "tasks.json", tasks)
    _write_json_atomically(Path(out) / "coco.json", coco)


def _prepare(folder: Path, labels: Sequence[Label], out: Path,
             image_reference: Callable[[Path], str]) -> tuple[list[str], dict[str, str]]:
    """The images' relative paths and references; a path the reference refuses stops the run before any model runs."""
    if not labels:
        raise ValueError("annotate_folder() needs at least one label")
    paths = find_images(folder, exclude=out)
    relatives = [path.relative_to(folder).as_posix() for path in paths]
    references = {relative: image_reference(path) for relative, path in zip(relatives, paths)}
    Path(out).mkdir(parents=True, exist_ok=True)
    return relatives, references


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
    """Segment every image below ``folder`` in this process; write tasks.json, coco.json and masks/ under ``out``."""
    if batch < 1:
        raise ValueError("batch must be at least 1")
    folder, out = Path(folder), Path(out)
    relatives, references = _prepare(folder, labels, out, image_reference)
    ledger = MemoryLedger(len(relatives))
    records = []
    with RunBar(len(relatives), "annotate", progress, unit="image") as bar:
        for relative, result in segment_folder_images(folder, relatives, labels, out, segmenter, options,
                                                      model_version, from_name, to_name, batch, limits):
            if isinstance(result, ImageRecord):
                records.append(result)
                ledger.record(relative, Outcome.DONE)
            else:
                ledger.record(relative, Outcome.FAILED, result)
            bar.show(ledger.progress())
    write_dataset(out, labels, records, references)
    return _summary(ledger.progress())


def _summary(progress: RunProgress) -> FolderSummary:
    return FolderSummary(done=progress.done, failed=progress.failures, seconds=progress.seconds)


def annotate_folder_queued(
    folder: Path,
    labels: Sequence[Label],
    out: Path,
    options: SegmentOptions,
    image_reference: Callable[[Path], str],
    settings: Settings,
    from_name: str = "label",
    to_name: str = "image",
    progress: bool = True,
) -> FolderSummary:
    """The same files as ``annotate_folder``, the images segmented by RQ workers (``freesegdiff worker``).

    Workers read ``folder`` and write under ``out`` at the same paths, so on several machines
    both must be on a shared file system. Each worker writes its images' masks and one record
    per image in ``out/.parts-<run>/``; this process waits for the run, writes tasks.json and
    coco.json in the images' order, and removes the records. ``seconds`` is the workers' time,
    from the first chunk's start to the last image.
    """
    folder, out = Path(folder).resolve(), Path(out).resolve()
    relatives, references = _prepare(folder, labels, out, image_reference)
    connection = redis_connection(settings)
    queue = job_queue(connection, settings)
    ledger = RedisLedger.create(connection, "folder", str(out), len(relatives))
    enqueue_chunks(queue, ledger, "backend.jobs.folder.annotate_folder_chunk", relatives, {
        "folder": str(folder), "out": str(out), "labels": [[label.name, list(label.synonyms)] for label in labels],
        "options": dataclasses.asdict(options), "from_name": from_name, "to_name": to_name,
    }, settings)
    log.info("run %s: %d images in %d chunks on queue %s", ledger.run_id, len(relatives),
             len(ledger.job_ids()), settings.queue_name)
    outcome = wait_for_run(queue, ledger, progress, unit="image")
    parts = _parts_folder(out, ledger.run_id)
    records = [ImageRecord(**json.loads(path.read_text(encoding="utf-8")))
               for path in (_part_path(parts, relative) for relative in relatives) if path.is_file()]
    write_dataset(out, labels, records, references)
    shutil.rmtree(parts, ignore_errors=True)
    return _summary(outcome)


def annotate_folder_chunk(run_id: str, images: list[str], *, folder: str, out: str, labels: list[list],
                          options: dict, from_name: str, to_name: str) -> int:
    """RQ job (by dotted path, JSON arguments): segment a chunk of a queued folder run. Returns its size."""
    context = chunk_context(run_id)
    settings = context.settings
    parts = _parts_folder(Path(out), run_id)
    pending = [relative for relative in images if not context.ledger.settled(relative)]
    for relative, result in segment_folder_images(
        Path(folder), pending, [Label(name, tuple(synonyms)) for name, synonyms in labels], Path(out),
        Segmenter.from_settings(settings), SegmentOptions(**options), context.version, from_name, to_name,
        settings.max_batch, settings.image_limits,
    ):
        if isinstance(result, ImageRecord):
            path = _part_path(parts, relative)
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_json_atomically(path, dataclasses.asdict(result))
            context.ledger.record(relative, Outcome.DONE)
        else:
            log.warning("%s failed: %s", relative, result)
            context.ledger.record(relative, Outcome.FAILED, result)
    return len(images)


def _parts_folder(out: Path, run_id: str) -> Path:
    return out / f".parts-{run_id}"


def _part_path(parts: Path, relative: str) -> Path:
    return parts / f"{relative}.json"
