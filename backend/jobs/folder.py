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

from backend.images import ImageError, ImageLimits, read_image_data
from backend.storage.backing import runs_redis
from backend.storage.job_ledger import ProcessLedger, Outcome, RedisLedger, RunProgress
from backend.jobs.progress import RunBar
from backend.jobs.queue import chunk_context, enqueue_chunks, job_queue, wait_for_run
from backend.exports.coco import coco_annotations, coco_categories
from backend.exports.brush_results import brush_results, prediction
from backend.models.identity import model_version
from backend.exports.overlay import label_index_image
from backend.options import SegmentOptions
from backend.pipeline.encoding import Encoding
from backend.pipeline.segmenter import Segmenter
from backend.models.process import process_segmenter
from backend.pipeline.vocabulary import Label
from backend.settings import Settings
from backend.storage.cached_encoder import CachedEncoder, one_pass_cache, segmenter_encoder
from backend.storage.feature_cache import FeatureCache

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


@dataclass(frozen=True)
class FolderRun:
    """What a folder run segments and writes; the same in this process and on every worker."""

    folder: Path
    out: Path
    labels: tuple[Label, ...]
    options: SegmentOptions
    from_name: str = "label"
    to_name: str = "image"

    def to_json(self) -> dict:
        """Plain JSON, as RQ jobs carry their arguments."""
        return {"folder": str(self.folder), "out": str(self.out),
                "labels": [[label.name, list(label.synonyms)] for label in self.labels],
                "options": dataclasses.asdict(self.options), "from_name": self.from_name, "to_name": self.to_name}

    @classmethod
    def from_json(cls, value: dict) -> FolderRun:
        return cls(Path(value["folder"]), Path(value["out"]),
                   tuple(Label(name, tuple(synonyms)) for name, synonyms in value["labels"]),
                   SegmentOptions(**value["options"]), value["from_name"], value["to_name"])


@dataclass(frozen=True)
class ImageRecord:
    """One segmented image: its prediction, size and COCO annotations; JSON, so that workers can hand it over."""

    relative: str  # path below the folder, with forward slashes
    prediction: dict
    width: int
    height: int
    annotations: list[dict]


@dataclass(frozen=True)
class FolderImage:
    """What became of one image of the folder: its record, or the one-line reason it failed."""

    relative: str
    record: ImageRecord | None
    failure: str = ""


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
    run: FolderRun, relatives: Sequence[str], segmenter: Segmenter, model_version: str, batch: int,
    limits: ImageLimits, cache: FeatureCache | None = None,
) -> Iterator[FolderImage]:
    """Segment the images ``batch`` at a time (a batch refined while the next is encoded, through ``cache``),
    writing each label-index PNG under ``out/masks``; yields what became of each image."""
    batches = _read_batches(run.folder, relatives, batch, limits, segmenter_encoder(segmenter, cache))
    for (unreadable, names), segmentations in segmenter.segment_encoded(batches, run.labels, run.options):
        yield from unreadable
        for relative, segmentation in zip(names, segmentations):
            results = brush_results(segmentation, run.from_name, run.to_name)
            height, width = segmentation.label_map.shape
            mask_path = (run.out / "masks" / relative).with_suffix(".png")
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            label_index_image(segmentation.label_map).save(mask_path)
            yield FolderImage(relative, ImageRecord(relative, prediction(results, segmentation.score, model_version),
                                                    int(width), int(height), coco_annotations(segmentation)))


def _read_batches(
    folder: Path, relatives: Sequence[str], batch: int, limits: ImageLimits, encoder: CachedEncoder,
) -> Iterator[tuple[tuple[list[FolderImage], list[str]], list[Encoding], list[np.ndarray]]]:
    """Batches of decoded images and their encodings, each tagged with its unreadable images (as failures) and its
    readable names."""
    for first in range(0, len(relatives), batch):
        unreadable, names, files = [], [], []
        for relative in relatives[first:first + batch]:
            try:
                files.append(read_image_data(folder / relative, limits))
                names.append(relative)
            except ImageError as error:
                unreadable.append(FolderImage(relative, None, " ".join(str(error).split())))
        yield (unreadable, names), encoder.encode_batch(files).encodings, [pixels for _, pixels in files]


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
        "categories": coco_categories(labels),
        "annotations": annotations,
    }
    _write_json_atomically(Path(out) / "tasks.json", tasks)
    _write_json_atomically(Path(out) / "coco.json", coco)


def _prepare(run: FolderRun, image_reference: Callable[[Path], str]) -> tuple[list[str], dict[str, str]]:
    """The images' relative paths and references; a path the reference refuses stops the run before any model runs."""
    if not run.labels:
        raise ValueError("annotate_folder() needs at least one label")
    paths = find_images(run.folder, exclude=run.out)
    relatives = [path.relative_to(run.folder).as_posix() for path in paths]
    references = {relative: image_reference(path) for relative, path in zip(relatives, paths)}
    run.out.mkdir(parents=True, exist_ok=True)
    return relatives, references


def annotate_folder(
    run: FolderRun,
    segmenter: Segmenter,
    model_version: str,
    image_reference: Callable[[Path], str],
    batch: int = 4,
    limits: ImageLimits = ImageLimits(),  # noqa: B008 (frozen, so a shared default is safe)
    progress: bool = True,
    cache: FeatureCache | None = None,
) -> FolderSummary:
    """Segment every image below the run's folder in this process, encoding through ``cache`` (``one_pass_cache``);
    write tasks.json, coco.json and masks/."""
    if batch < 1:
        raise ValueError("batch must be at least 1")
    relatives, references = _prepare(run, image_reference)
    ledger = ProcessLedger(len(relatives))
    records = []
    with RunBar(len(relatives), "annotate", progress, unit="image") as bar:
        for image in segment_folder_images(run, relatives, segmenter, model_version, batch, limits, cache):
            if image.record is not None:
                records.append(image.record)
                ledger.record(image.relative, Outcome.DONE)
            else:
                ledger.record(image.relative, Outcome.FAILED, image.failure)
            bar.show(ledger.progress())
    write_dataset(run.out, run.labels, records, references)
    return _summary(ledger.progress())


def _summary(progress: RunProgress) -> FolderSummary:
    return FolderSummary(done=progress.done, failed=progress.failures, seconds=progress.seconds)


def annotate_folder_queued(run: FolderRun, image_reference: Callable[[Path], str], settings: Settings,
                           progress: bool = True) -> FolderSummary:
    """The same files as ``annotate_folder``, the images segmented by RQ workers (``freesegdiff worker``).

    Workers read the folder and write under ``out`` at the same paths, so on several machines
    both must be on a shared file system. Each worker writes its images' masks and one record
    per image in ``out/.parts-<run>/``; this process waits for the run, writes tasks.json and
    coco.json in the images' order, and removes the records. ``seconds`` is the workers' time,
    from the first chunk's start to the last image.
    """
    run = dataclasses.replace(run, folder=run.folder.resolve(), out=run.out.resolve())
    relatives, references = _prepare(run, image_reference)
    connection = runs_redis(settings)
    queue = job_queue(connection, settings)
    ledger = RedisLedger.create(connection, "folder", str(run.out), len(relatives))
    enqueue_chunks(queue, ledger, "backend.jobs.folder.annotate_folder_chunk", relatives, {"run": run.to_json()},
                   settings)
    log.info("run %s: %d images in %d chunks on queue %s", ledger.run_id, len(relatives),
             len(ledger.job_ids()), settings.queue_name)
    outcome = wait_for_run(queue, ledger, progress, unit="image")
    parts = _parts_folder(run.out, ledger.run_id)
    records = [ImageRecord(**json.loads(path.read_text(encoding="utf-8")))
               for path in (_part_path(parts, relative) for relative in relatives) if path.is_file()]
    write_dataset(run.out, run.labels, records, references)
    shutil.rmtree(parts, ignore_errors=True)
    return _summary(outcome)


def annotate_folder_chunk(run_id: str, images: list[str], *, run: dict) -> int:
    """RQ job (by dotted path, JSON arguments): segment a chunk of a queued folder run. Returns its size."""
    context = chunk_context(run_id)
    settings = context.settings
    version = model_version(settings)
    context.begin(version)
    folder_run = FolderRun.from_json(run)
    parts = _parts_folder(folder_run.out, run_id)
    pending = [relative for relative in images if not context.ledger.settled(relative)]
    for image in segment_folder_images(folder_run, pending, process_segmenter(settings), version,
                                       settings.max_batch, settings.image_limits, one_pass_cache(settings)):
        if image.record is not None:
            path = _part_path(parts, image.relative)
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_json_atomically(path, dataclasses.asdict(image.record))
            context.ledger.record(image.relative, Outcome.DONE)
        else:
            log.warning("%s failed: %s", image.relative, image.failure)
            context.ledger.record(image.relative, Outcome.FAILED, image.failure)
    return len(images)


def _parts_folder(out: Path, run_id: str) -> Path:
    return out / f".parts-{run_id}"


def _part_path(parts: Path, relative: str) -> Path:
    return parts / f"{relative}.json"
