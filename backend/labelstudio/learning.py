"""Teaching a project's memory from the annotations Label Studio holds, and only those.

A webhook names an annotation; its payload is a hint, never the truth. ``ProjectTeacher``
reads the annotation back from Label Studio's API by its id, checks that its task belongs to
the project the webhook named, loads the task's image, takes its encoding (``Encoder``: the
server's feature cache or inference worker, or the CLI's segmenter), rasterises the
annotation's brush and polygon regions and teaches them, replacing what the annotation
taught before. An annotation is forgotten only when Label Studio answers 404 for it. A
rebuild (Label Studio's "Start Training", ``freesegdiff learn``) teaches every annotation of
every task again, logging its progress, and replaces the memory in one locked write.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from label_studio_sdk.core.api_error import ApiError

from backend.labelstudio.access import LabelStudioAccess
from backend.labelstudio.annotations import annotation_regions
from backend.labelstudio.backoff import Backoff, with_backoff
from backend.labelstudio.client import LabelStudioProject
from backend.labelstudio.config import ProjectVocabulary, parse_label_config
from backend.labelstudio.images import TaskImage, TaskImageLoader
from backend.memories import ProjectMemories
from backend.pipeline.encoding import Encoding
from backend.pipeline.memory import Memory, Taught
from backend.pipeline.teaching import taught_examples

log = logging.getLogger(__name__)

Encoder = Callable[[TaskImage], Encoding]  # a task image's encoding, by the models of the memory's fingerprint


class ForeignAnnotationError(ValueError):
    """The annotation's task is not in the project the webhook named; ``kind`` is ``foreign_annotation``."""

    kind = "foreign_annotation"


@dataclass(frozen=True)
class ProjectTeacher:
    """Teaches the memories of ``memories`` for the models of ``fingerprint``."""

    memories: ProjectMemories
    images: TaskImageLoader
    encode: Encoder
    fingerprint: str
    backoff: Backoff

    def learn(self, project: str, annotation_id: int, access: LabelStudioAccess) -> Memory | None:
        """Teach (or re-teach) the annotation as Label Studio holds it; raises when it is not the project's."""
        api = LabelStudioProject(access, int(project), self.backoff)
        annotation = with_backoff(lambda: api.annotation(annotation_id), f"reading annotation {annotation_id}",
                                  self.backoff)
        task = with_backoff(lambda: api.task(int(annotation["task"])), f"reading task {annotation['task']}",
                            self.backoff)
        if str(task.get("project")) != project:
            raise ForeignAnnotationError(
                f"annotation {annotation_id} is of task {task.get('id')} in project {task.get('project')}, "
                f"not of project {project}: nothing learned")
        if annotation.get("was_cancelled"):  # a skipped task teaches nothing
            self.memories.forget(project, self.fingerprint, str(annotation_id))
            return None
        taught, channels = self._taught(annotation, task, self._vocabulary(api), access)
        memory = self.memories.change(project, self.fingerprint, channels,
                                      lambda memory: memory.learn(str(annotation_id), taught))
        log.info("project %s: learned annotation %s of task %s (%s); memory revision %d", project, annotation_id,
                 task.get("id"), ", ".join(sorted(label or "unlabeled" for label in taught)) or "no region",
                 memory.revision)
        return memory

    def forget(self, project: str, annotation_id: int, access: LabelStudioAccess) -> bool:
        """Forget the annotation if Label Studio no longer holds it (404); False when it still does."""
        api = LabelStudioProject(access, int(project), self.backoff)
        try:
            with_backoff(lambda: api.annotation(annotation_id), f"reading annotation {annotation_id}", self.backoff)
        except ApiError as error:
            if error.status_code != 404:
                raise
            self.memories.forget(project, self.fingerprint, str(annotation_id))
            log.info("project %s: forgot annotation %s", project, annotation_id)
            return True
        log.warning("project %s: annotation %s was said deleted but Label Studio still holds it: kept",
                    project, annotation_id)
        return False

    def rebuild(self, project: str, access: LabelStudioAccess) -> Memory:
        """The project's memory made again from all its annotations, replacing the saved one at the end."""
        api = LabelStudioProject(access, int(project), self.backoff)
        vocabulary = self._vocabulary(api)
        task_ids = api.task_ids()
        log.info("project %s: rebuilding the memory from the annotations of %d tasks", project, len(task_ids))
        learned: list[tuple[str, Taught]] = []
        channels = 0
        for done, task_id in enumerate(task_ids, 1):
            annotations = [a for a in with_backoff(lambda: api.annotations(task_id),
                                                   f"listing annotations of task {task_id}", self.backoff)
                           if not a.get("was_cancelled") and a.get("result")]
            if annotations:
                task = with_backoff(lambda: api.task(task_id), f"reading task {task_id}", self.backoff)
                for annotation in annotations:
                    taught, channels = self._taught(annotation, task, vocabulary, access)
                    learned.append((str(annotation["id"]), taught))
            log.info("project %s: rebuild %d/%d tasks, %d annotations", project, done, len(task_ids), len(learned))

        def replace(memory: Memory) -> None:
            memory.clear()
            for annotation_id, taught in learned:
                memory.learn(annotation_id, taught)

        memory = self.memories.change(project, self.fingerprint, channels, replace)
        log.info("project %s: memory rebuilt from %d annotations, revision %d, %d bytes", project, len(learned),
                 memory.revision, memory.nbytes)
        return memory

    @staticmethod
    def _vocabulary(api: LabelStudioProject) -> ProjectVocabulary:
        return parse_label_config(with_backoff(api.label_config, f"reading project {api.project}", api.backoff))

    def _taught(self, annotation: dict, task: dict, vocabulary: ProjectVocabulary,
                access: LabelStudioAccess) -> tuple[Taught, int]:
        """What the annotation teaches on its task's image, and the features' channel count."""
        image = with_backoff(lambda: self.images.load(task, vocabulary.image_key, access),
                             f"loading the image of task {task.get('id')}", self.backoff)
        encoding = self.encode(image)
        if encoding.fingerprint != self.fingerprint:
            raise ValueError(f"encoding made by other models ({encoding.fingerprint} != {self.fingerprint})")
        height, width = image.pixels.shape[:2]
        regions = annotation_regions(annotation.get("result") or [], height, width, vocabulary.from_name)
        return taught_examples(encoding, regions), encoding.features.shape[0]
