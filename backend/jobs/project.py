"""Pre-annotate every task of a Label Studio project, in this process or as RQ chunks on workers.

A task ends with exactly one prediction of our ``model_version``: one that already has
one is skipped (``overwrite``: that one is replaced; other versions' predictions are left
alone), and the check is made again, under a per-task lock, right before writing, since
a chunk may be run again after its worker died. A task whose image cannot be fetched or
decoded, or on which Label Studio keeps failing after the retries, is recorded as failed
with a one-line reason, and the run goes on.

Both kinds of run predict with the project's memory (what its annotators' corrections taught,
in the shared store) as it is when the run starts: in this process, or when a queued run's first
chunk starts on a worker, whose models' memory it is (every later chunk gets that one from the
run's ledger). So a run writes one ``model_version``, which carries the memory's revision (``...-m12``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from backend.net.fetch import ImageFetchError
from backend.images import ImageError
from backend.labelstudio.backoff import LABEL_STUDIO_ERRORS, Backoff, describe, with_backoff
from backend.labelstudio.client import LabelStudioProject
from backend.storage.job_ledger import Ledger, ProcessLedger, Outcome, RedisLedger, RunProgress
from backend.jobs.locks import NoLocks, RedisLocks, Refresh, WriteLocks
from backend.jobs.progress import RunBar
from backend.jobs.queue import chunk_context, enqueue_chunks, job_queue, wait_for_run
from backend.labelstudio.config import ProjectVocabulary, parse_label_config
from backend.labelstudio.task_images import TaskImage, TaskImageLoader
from backend.labelstudio.project_context import ProjectContext, memory_of, open_project, project_context
from backend.labelstudio.projects import ProjectSetup, ProjectStore
from backend.exports.brush_results import project_prediction
from backend.storage.backing import project_memories, runs_redis
from backend.models.process import process_segmenter
from backend.pipeline.encoding import Encoding
from backend.pipeline.memory import Memory
from backend.pipeline.exemplars import Exemplars
from backend.options import SegmentOptions
from backend.pipeline.segmenter import Segmentation
from backend.pipeline.vocabulary import Label
from backend.settings import Settings
from backend.storage.cached_encoder import CachedEncoder, one_pass_cache, segmenter_encoder

log = logging.getLogger(__name__)


def project_vocabulary(project: LabelStudioProject, settings: Settings) -> ProjectVocabulary:
    """The project's label config, read; LabelConfigError when no task of it could be predicted."""
    config = with_backoff(project.label_config, f"reading the label config of project {project.project}",
                          Backoff.from_settings(settings))
    return parse_label_config(config, settings.max_labels)


@dataclass(frozen=True)
class ProjectRun:
    """What a project run predicts and writes: the same in this process and in every chunk."""

    project: LabelStudioProject
    context: ProjectContext  # its model_version is the one the run's predictions carry
    overwrite: bool  # replace a task's prediction of that version rather than skip the task


def project_run(project: LabelStudioProject, vocabulary: ProjectVocabulary, connection: ProjectSetup,
                settings: Settings, memory: Memory | None, overwrite: bool) -> ProjectRun:
    """A run predicting with the project's context: its config's ``vocabulary``, ``connection``'s extra_params
    and the project's ``memory``, if it has one."""
    context = project_context(settings, vocabulary, connection, memory_of(memory))
    return ProjectRun(project, context, overwrite)


@dataclass(frozen=True)
class ProjectRunResult:
    """How a run ended, for ``freesegdiff annotate-project`` to print."""

    progress: RunProgress | None  # None: a queued run not waited for
    version: str | None  # the model_version of its predictions; None when no chunk has started
    run_id: str | None = None  # a queued run's


class BatchSegmenter(Protocol):
    """What a run segments with: a ``Segmenter``, or the server's inference worker at background priority."""

    def segment_encoded(self, batches: Iterable[tuple[list[int], Sequence[Encoding], Sequence[np.ndarray]]],
                        labels: Sequence[Label], options: SegmentOptions, exemplars: Exemplars | None = None,
                        ) -> Iterator[tuple[list[int], list[Segmentation]]]: ...


class TaskAnnotator:
    """Predicts tasks of one project and writes their predictions, settling each in ``ledger``."""

    def __init__(self, run: ProjectRun, segmenter: BatchSegmenter, encoder: CachedEncoder, settings: Settings,
                 ledger: Ledger, locks: WriteLocks) -> None:
        self.project, self.vocabulary, self.version = run.project, run.context.vocabulary, run.context.model_version
        self.overwrite, self.exemplars, self.options = run.overwrite, run.context.exemplars, run.context.options
        self.segmenter, self.ledger, self.locks = segmenter, ledger, locks
        self.encoder = encoder
        self.backoff = Backoff.from_settings(settings)
        self.images = TaskImageLoader.from_settings(settings)
        self.batch = settings.max_batch

    def annotate(self, task_ids: Sequence[int], after_batch: Callable[[], None] = lambda: None) -> None:
        """Settle every task of ``task_ids`` not settled yet; images are encoded ``max_batch`` at a time (through the
        feature cache), and a batch's predictions are written while the next batch is refined. ``after_batch``
        follows each batch's writes."""
        batches = self._batches_to_predict(task_ids)
        for loaded, segmentations in self.segmenter.segment_encoded(batches, self.vocabulary.labels, self.options,
                                                                     self.exemplars):
            for task_id, segmentation in zip(loaded, segmentations):
                self._write(task_id, project_prediction(segmentation, self.vocabulary, self.version))
            after_batch()

    def _batches_to_predict(self, task_ids: Sequence[int]) -> Iterator[tuple[list[int], list[Encoding],
                                                                              list[np.ndarray]]]:
        """The tasks to predict, their encodings and images, ``max_batch`` tasks looked at a time."""
        for start in range(0, len(task_ids), self.batch):
            loaded = [(task_id, image) for task_id in task_ids[start:start + self.batch]
                      if (image := self._image_to_predict(task_id)) is not None]
            if loaded:
                encoded = self.encoder.encode_batch([(image.data, image.pixels) for _, image in loaded])
                yield [task_id for task_id, _ in loaded], encoded.encodings, [image.pixels for _, image in loaded]

    def _image_to_predict(self, task_id: int) -> TaskImage | None:
        """The task's image, or None when the task is settled already, skipped or failed."""
        if self.ledger.settled(str(task_id)):
            return None
        try:
            task = with_backoff(lambda: self.project.task(task_id), f"reading task {task_id}", self.backoff)
            if self.version in task["model_versions"] and not self.overwrite:
                self._settle(task_id, Outcome.SKIPPED)
                return None
            return with_backoff(lambda: self.images.load(task, self.vocabulary.image_key, self.project.access),
                                f"downloading the image of task {task_id}", self.backoff)
        except (*LABEL_STUDIO_ERRORS, ImageFetchError, ImageError) as error:
            self._settle(task_id, Outcome.FAILED, describe(error))
            return None

    def _write(self, task_id: int, prediction: dict) -> None:
        with self.locks.holding(str(task_id)) as refresh:
            if refresh is None:
                log.warning("task %s: another worker kept its write lock for a whole lease; leaving it to that worker",
                            task_id)
                return
            try:
                self._settle(task_id, with_backoff(lambda: self._replace(task_id, prediction, refresh),
                                                   f"writing the prediction of task {task_id}", self.backoff))
            except LABEL_STUDIO_ERRORS as error:
                self._settle(task_id, Outcome.FAILED, describe(error))

    def _replace(self, task_id: int, prediction: dict, refresh: Refresh) -> Outcome:
        """One try: look at the task's predictions again (a lost answer may hide a stored one), then write."""
        refresh()
        ours = self.project.prediction_ids(task_id, self.version)
        if ours and not self.overwrite:
            return Outcome.SKIPPED
        for prediction_id in ours:
            self.project.delete_prediction(prediction_id)
        self.project.create_prediction(task_id, prediction)
        return Outcome.DONE

    def _settle(self, task_id: int, outcome: Outcome, reason: str = "") -> None:
        if not self.ledger.record(str(task_id), outcome, reason):
            return
        if outcome is Outcome.FAILED:
            log.warning("task %s failed: %s", task_id, reason)
        else:
            log.debug("task %s: %s", task_id, outcome.value)


def annotate_project(project: LabelStudioProject, connection: ProjectSetup, settings: Settings, overwrite: bool,
                     progress: bool = True) -> ProjectRunResult:
    """The whole project in this process, ``max_batch`` tasks at a time, with a progress bar; ``connection``
    (``open_project``'s) gives its extra_params."""
    vocabulary = project_vocabulary(project, settings)  # before loading any model
    segmenter = process_segmenter(settings)  # and before the run's clock starts
    task_ids = project.task_ids()
    ledger = ProcessLedger(len(task_ids))
    memory = project_memories(settings).load(str(project.project), segmenter.fingerprint)
    run = project_run(project, vocabulary, connection, settings, memory, overwrite)
    annotator = TaskAnnotator(run, segmenter, segmenter_encoder(segmenter, one_pass_cache(settings)), settings, ledger,
                              NoLocks())
    with RunBar(len(task_ids), "annotate", progress) as bar:
        annotator.annotate(task_ids, after_batch=lambda: bar.show(ledger.progress()))
        bar.show(ledger.progress())  # tasks skipped or failed after the last batch
    return ProjectRunResult(ledger.progress(), run.context.model_version)


def annotate_project_queued(project: LabelStudioProject, settings: Settings, overwrite: bool,
                            wait: bool = True, progress: bool = True,
                            task_ids: Sequence[int] | None = None) -> ProjectRunResult:
    """Enqueue the project's tasks (``task_ids``, else all) in chunks for ``freesegdiff worker``; with ``wait``,
    follow the run to its end.

    The label config is checked first, so that a project no worker could serve fails here.
    """
    project_vocabulary(project, settings)
    task_ids = project.task_ids() if task_ids is None else list(task_ids)
    connection = runs_redis(settings)
    queue = job_queue(connection, settings)
    ledger = RedisLedger.create(connection, "project", f"{project.project} on {project.access.url}", len(task_ids))
    enqueue_chunks(queue, ledger, "backend.jobs.project.annotate_project_chunk", task_ids,
                   {"project": project.project, "overwrite": overwrite}, settings)
    log.info("run %s: %d tasks of project %s in %d chunks on queue %s", ledger.run_id, len(task_ids),
             project.project, len(ledger.job_ids()), settings.queue_name)
    outcome = wait_for_run(queue, ledger, progress) if wait else None
    return ProjectRunResult(outcome, ledger.fields().get("model_version"), ledger.run_id)


def annotate_project_chunk(run_id: str, task_ids: list[int], *, project: int, overwrite: bool) -> int:
    """RQ job (by dotted path, JSON arguments): one chunk of a queued run; Label Studio's address and key
    and the connection's extra_params are the worker's own (``open_project``), never the job's arguments.
    Every chunk predicts with the project's memory as the run's first chunk read it. Returns how many tasks
    it was given."""
    context = chunk_context(run_id)
    if all(context.ledger.settled(str(task_id)) for task_id in task_ids):
        return len(task_ids)  # run again after its tasks were settled: nothing to predict, no memory to read
    settings = context.settings
    memories = project_memories(settings)
    labelstudio, connection = open_project(settings, project, ProjectStore(memories.store.store))
    vocabulary = project_vocabulary(labelstudio, settings)
    segmenter = process_segmenter(settings)
    data = context.ledger.claim_memory(lambda: memories.store.load(str(project), segmenter.fingerprint))
    run = project_run(labelstudio, vocabulary, connection, settings, memories.parse(data), overwrite)
    context.begin(run.context.model_version)
    scope = hashlib.sha256(f"{labelstudio.access.url}\x00{run.context.model_version}".encode()).hexdigest()[:16]
    annotator = TaskAnnotator(run, segmenter, segmenter_encoder(segmenter, one_pass_cache(settings)), settings,
                              context.ledger,
                              RedisLocks(context.connection, scope, settings.queue_lease_seconds))
    annotator.annotate(task_ids)
    if context.ledger.progress().complete:
        context.ledger.release_memory()
    return len(task_ids)
