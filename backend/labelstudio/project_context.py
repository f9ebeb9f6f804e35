"""Everything one project's predictions depend on, resolved in one place with one precedence.

The server's /predict, the project jobs (in this process and queued chunks) and the CLI's
project commands all build a ``ProjectContext`` here, so they predict alike:

- options: the settings' defaults (``FREESEG_K``, ...), then the label config's ``model_*``
  attributes, then the connection's ``extra_params``: the later wins, option by option;
- Label Studio access: LABEL_STUDIO_URL with LABEL_STUDIO_API_KEY when the URL is set (the
  CLI's ``--url``/``--api-key`` stand for them), else the host and token /setup kept;
- the memory's exemplars and the ``model_version`` that carries its revision (``project_model_version``:
  what /setup answers and every prediction of the project carries).

The connection (``extra_params``, host, token) is what /setup kept in the shared project store:
the very record /predict reads, so a job predicts exactly as /predict does. Only when the store
holds nothing for the project (a worker on another machine, a MODEL_DIR not shared, a store
that is away) is it read from Label Studio's API (``GET /api/ml?project=<id>``): the
``extra_params`` of the project's connections to this backend (``model_version`` ours).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

from backend.labelstudio.access import LabelStudioAccess
from backend.labelstudio.backoff import Backoff, with_backoff
from backend.labelstudio.client import LabelStudioProject
from backend.labelstudio.config import ProjectVocabulary
from backend.labelstudio.projects import ProjectSetup, ProjectStore
from backend.models.identity import model_version
from backend.options import SegmentOptions, option_changes
from backend.pipeline.exemplars import Exemplars
from backend.pipeline.memory import Memory
from backend.settings import Settings
from backend.storage.memory_store import memory_version

log = logging.getLogger(__name__)


ProjectMemory = tuple[int, Exemplars]  # a memory's revision and exemplars, as ``ProjectMemories.exemplars`` gives them


def memory_of(memory: Memory | None) -> ProjectMemory | None:
    """A memory read whole (a job's, as it was when the run started) as predictions use it."""
    return (memory.revision, Exemplars.from_memory(memory)) if memory is not None else None


def project_model_version(settings: Settings, memory: ProjectMemory | None) -> str:
    """The model_version of a project's predictions: the models', with the revision of its ``memory`` if any."""
    return memory_version(model_version(settings), memory[0]) if memory is not None else model_version(settings)


@dataclass(frozen=True)
class ProjectContext:
    """What a project's predictions are made with: the same wherever they are made."""

    vocabulary: ProjectVocabulary
    options: SegmentOptions
    access: LabelStudioAccess
    model_version: str  # the models' model_version, with the memory's revision when it has one
    exemplars: Exemplars | None = None  # the project's memory


def project_context(settings: Settings, vocabulary: ProjectVocabulary, connection: ProjectSetup,
                    memory: ProjectMemory | None) -> ProjectContext:
    """The context of a project whose config reads as ``vocabulary``, connected as ``connection`` says, with
    ``memory`` (None: predict without one)."""
    options = dataclasses.replace(settings.segment_options,
                                  **{**vocabulary.options, **connection.options})
    return ProjectContext(vocabulary, options, label_studio_access(settings, lambda: connection),
                          project_model_version(settings, memory), memory[1] if memory is not None else None)


def label_studio_access(settings: Settings, kept: Callable[[], ProjectSetup]) -> LabelStudioAccess:
    """LABEL_STUDIO_URL with LABEL_STUDIO_API_KEY when the URL is set (``kept`` is not called: no store
    call); else the host and token /setup kept, as a pair."""
    if settings.label_studio_url:
        return LabelStudioAccess(settings.label_studio_url, settings.label_studio_api_key)
    return kept().access


def open_project(settings: Settings, project: int, store: ProjectStore) -> tuple[LabelStudioProject, ProjectSetup]:
    """The project on Label Studio and its connection: what /setup kept in ``store``, else Label Studio's record
    of it. ValueError when no access is known (LABEL_STUDIO_URL unset and no /setup kept)."""
    kept = store.load(project)
    api = LabelStudioProject(label_studio_access(settings, lambda: kept), project, Backoff.from_settings(settings))
    return api, (kept if kept != ProjectSetup() else connection_from_api(api))


def connection_from_api(api: LabelStudioProject) -> ProjectSetup:
    """The ``extra_params`` of the project's connections to this backend, as Label Studio lists them. Several that
    disagree: the latest connection's, with a warning; none: no option changes."""
    backends = with_backoff(api.our_ml_backends, f"listing the ML backends of project {api.project}", api.backoff)
    if not backends:
        log.info("project %s: no connection to this backend in Label Studio: the label config's options only",
                 api.project)
        return ProjectSetup()
    latest = max(backends, key=lambda backend: backend["id"])
    if any(backend["extra_params"] != latest["extra_params"] for backend in backends):
        log.warning("project %s: its connections to this backend have different extra_params; using those of the "
                    "latest (ML backend %s)", api.project, latest["id"])
    options = option_changes(latest["extra_params"] or {},
                             where=lambda name: f"extra_params.{name} of ML backend {latest['id']}")
    return ProjectSetup(options=options)
