"""Teaching a project's memory from the annotations Label Studio holds, and only those.

A webhook names an annotation; its payload is a hint, never the truth. ``ProjectTeacher``
reads the annotation back from Label Studio's API by its id, checks that its task belongs to
the project the webhook named, loads the task's image, takes its encoding (``Encoder``: the
server's feature cache or inference worker, or the CLI's segmenter), rasterises the
annotation's brush and polygon regions and teaches them, replacing what the annotation
taught before. Only the labels of the project's config are taught, and an annotation that
kept our prediction unchanged teaches nothing. An annotation, a task or a project is
forgotten only when Label Studio answers 404 for it; the memory then refuses the annotation
(or the task's annotations) for good, so a learn that read it before the delete cannot bring
it back, and an older version of an annotation never replaces a newer one (``updated_at``,
compared under the memory's lock). A rebuild (Label Studio's "Start Training", ``freesegdiff
learn``) teaches every annotation of every task again, logging its progress, into a new
memory within the bounds, and replaces the saved one in one locked write.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from label_studio_sdk.core.api_error import ApiError

from backend.labelstudio.access import LabelStudioAccess
from backend.labelstudio.annotations import BrushSizeError, annotation_regions
from backend.labelstudio.backoff import Backoff, with_backoff
from backend.labelstudio.client import MODEL_VERSION_PREFIX, LabelStudioProject
from backend.inputs import MAX_LABELS
from backend.labelstudio.config import ProjectVocabulary, parse_label_config
from backend.labelstudio.corrections import compare
from backend.labelstudio.task_images import TaskImage, TaskImageLoader
from backend.labelstudio.projects import ProjectStore
from backend.storage.feedback_log import KEPT
from backend.storage.memory_store import ProjectMemories
from backend.pipeline.encoding import Encoding
from backend.pipeline.memory import Memory, Source, Taught
from backend.pipeline.teaching import taught_examples

log = logging.getLogger(__name__)

Encoder = Callable[[TaskImage], Encoding]  # a task image's encoding, by the models of the memory's fingerprint


class ForeignAnnotationError(ValueError):
    """The annotation's task is not in the project the webhook named; ``kind`` is ``foreign_annotation``."""

    kind = "foreign_annotation"


@dataclass(frozen=True)
class ProjectTeacher:
    """Teaches the memories of ``memories`` for the models of ``fingerprint``; ``projects`` holds the setups."""

    memories: ProjectMemories
    projects: ProjectStore
    images: TaskImageLoader
    encode: Encoder
    fingerprint: str
    backoff: Backoff
    max_labels: int = MAX_LABELS  # FREESEG_MAX_LABELS

    def learn(self, project: str, annotation_id: int, access: LabelStudioAccess) -> Memory | None:
        """Teach (or re-teach) the annotation as Label Studio holds it; raises when it is not the project's.

        None when it teaches nothing: skipped, or our prediction accepted unchanged.
        """
        api = LabelStudioProject(access, int(project), self.backoff)
        annotation = with_backoff(lambda: api.annotation(annotation_id), f"reading annotation {annotation_id}",
                                  self.backoff)
        task_id = int(annotation["task"])
        found = with_backoff(lambda: api.tasks([task_id]), f"reading task {task_id}", self.backoff)
        if not found:
            raise ForeignAnnotationError(
                f"annotation {annotation_id} is of task {task_id}, which project {project} does not hold: "
                f"nothing learned")
        task = found[0]
        lesson = self._lesson(api, annotation, task, self._vocabulary(api), access)
        if lesson is None:
            self.memories.forget(project, self.fingerprint, str(annotation_id))
            return None
        taught, channels = lesson
        source = Source(str(task.get("id")), annotation.get("updated_at"))
        memory = self.memories.change(project, self.fingerprint, channels,
                                      lambda memory: memory.learn(str(annotation_id), taught, source))
        log.info("project %s: learned annotation %s of task %s (%s); memory revision %d", project, annotation_id,
                 task.get("id"), ", ".join(sorted(label or "unlabeled" for label in taught)) or "no region",
                 memory.revision)
        return memory

    def forget(self, project: str, annotation_id: int, access: LabelStudioAccess) -> bool:
        """Forget the annotation if Label Studio no longer holds it (404); False when it still does."""
        api = LabelStudioProject(access, int(project), self.backoff)
        if not self._deleted(lambda: api.annotation(annotation_id), f"annotation {annotation_id}"):
            return False
        self.memories.forget(project, self.fingerprint, str(annotation_id), deleted=True)
        log.info("project %s: forgot annotation %s", project, annotation_id)
        return True

    def forget_tasks(self, project: str, task_ids: list[int], access: LabelStudioAccess) -> bool:
        """Forget what the annotations of the tasks Label Studio no longer holds taught; False when it holds all."""
        api = LabelStudioProject(access, int(project), self.backoff)
        deleted = [str(task_id) for task_id in task_ids
                   if self._deleted(lambda task_id=task_id: api.task(task_id), f"task {task_id}")]
        if deleted:
            self.memories.forget_tasks(project, self.fingerprint, deleted)
            log.info("project %s: forgot the annotations of deleted tasks %s", project, ", ".join(deleted))
        return bool(deleted)

    def drop(self, project: str, access: LabelStudioAccess) -> bool:
        """Delete the project's memories and setup if Label Studio no longer holds it; False when it does."""
        api = LabelStudioProject(access, int(project), self.backoff)
        if not self._deleted(api.label_config, f"project {project}"):
            return False
        fingerprints = self.memories.drop(project)
        self.projects.delete(project)
        log.info("project %s: deleted in Label Studio: its setup and %d memories dropped", project, len(fingerprints))
        return True

    def rebuild(self, project: str, access: LabelStudioAccess) -> Memory:
        """The project's memory made again from all its annotations, replacing the saved one at the end.

        Each annotation is taught into a new memory as it is read, within the bounds: the rebuild never
        holds more than the bounds and one annotation's examples.
        """
        api = LabelStudioProject(access, int(project), self.backoff)
        vocabulary = self._vocabulary(api)
        task_ids = api.task_ids()
        log.info("project %s: rebuilding the memory from the annotations of %d tasks", project, len(task_ids))
        rebuilt = Memory(self.fingerprint, 0, self.memories.bounds)
        for done, task_id in enumerate(task_ids, 1):
            annotations = [a for a in with_backoff(lambda: api.annotations(task_id),
                                                   f"listing annotations of task {task_id}", self.backoff)
                           if a.get("result")]
            if annotations:
                task = with_backoff(lambda: api.task(task_id), f"reading task {task_id}", self.backoff)
                for annotation in annotations:
                    try:
                        lesson = self._lesson(api, annotation, task, vocabulary, access)
                    except BrushSizeError as error:  # one oversized annotation must not stop the whole rebuild
                        log.warning("project %s: annotation %s skipped: %s", project, annotation.get("id"), error)
                        continue
                    if lesson is not None:
                        rebuilt.channels = rebuilt.channels or lesson[1]
                        rebuilt.learn(str(annotation["id"]), lesson[0],
                                      Source(str(task_id), annotation.get("updated_at")))
            log.info("project %s: rebuild %d/%d tasks, %d annotations", project, done, len(task_ids),
                     len(rebuilt.annotations))
        memory = self.memories.change(project, self.fingerprint, rebuilt.channels,
                                      lambda memory: memory.replace(rebuilt))
        log.info("project %s: memory rebuilt from %d annotations, revision %d, %d bytes", project,
                 len(rebuilt.annotations), memory.revision, memory.nbytes)
        return memory

    def _deleted(self, read: Callable[[], object], what: str) -> bool:
        """True when Label Studio answers 404 for ``read``; False when it answers."""
        try:
            with_backoff(read, f"reading {what}", self.backoff)
        except ApiError as error:
            if error.status_code != 404:
                raise
            return True
        log.warning("%s was said deleted but Label Studio still holds it: kept", what)
        return False

    def _vocabulary(self, api: LabelStudioProject) -> ProjectVocabulary:
        return parse_label_config(with_backoff(api.label_config, f"reading project {api.project}", api.backoff),
                                  self.max_labels)

    def _lesson(self, api: LabelStudioProject, annotation: dict, task: dict, vocabulary: ProjectVocabulary,
                access: LabelStudioAccess) -> tuple[Taught, int] | None:
        """What the annotation teaches on its task's image (only its config's labels), and the channel count.

        None for a skipped annotation and for one that kept every region of our prediction as it was:
        teaching our own output back would only make the memory surer of its mistakes.
        """
        if annotation.get("was_cancelled"):
            return None
        if self._accepted_unchanged(api, annotation, task):
            log.info("annotation %s of task %s kept our prediction unchanged: it teaches nothing",
                     annotation.get("id"), task.get("id"))
            return None
        image = with_backoff(lambda: self.images.load(task, vocabulary.image_key, access),
                             f"loading the image of task {task.get('id')}", self.backoff)
        encoding = self.encode(image)
        if encoding.fingerprint != self.fingerprint:
            raise ValueError(f"encoding made by other models ({encoding.fingerprint} != {self.fingerprint})")
        height, width = image.pixels.shape[:2]
        names = {label.name for label in vocabulary.labels}
        regions = [region for region in annotation_regions(annotation.get("result") or [], height, width,
                                                           vocabulary.from_name) if region.label in names]
        return taught_examples(encoding, regions), encoding.features.shape[0]

    def _accepted_unchanged(self, api: LabelStudioProject, annotation: dict, task: dict) -> bool:
        """True when the annotation holds exactly the regions of our prediction it started from."""
        if not any(str(version).startswith(MODEL_VERSION_PREFIX) for version in task.get("model_versions") or []):
            return False
        prediction = with_backoff(lambda: api.our_prediction(int(task["id"]), annotation.get("parent_prediction")),
                                  f"reading the predictions of task {task.get('id')}", self.backoff)
        if prediction is None:
            return False
        regions = compare(prediction.get("result") or [], annotation.get("result") or [], self.images.limits.max_pixels)
        return bool(regions) and all(region.outcome == KEPT for region in regions)
