"""What /setup told the backend about each Label Studio project, shared by every process.

Label Studio sends a project's label config, ``extra_params``, host and token with /setup
only, and calls /setup again before a batch prediction but not before an interactive one.
So the answer of one process must be known to all of them (``WORKERS=2``, replicas behind
a balancer) and survive a restart: it is kept in the shared store (Redis, or a file under
MODEL_DIR readable only by its owner), as JSON. The token is stored as Label Studio gave it
and never logged: ``ProjectSetup``'s ``repr`` leaves it out.

Label Studio names a project ``"<id>.<created timestamp>"`` in /setup and /predict, and
``{"id": <id>, ...}`` in webhooks; ``project_id`` turns each into the id, the one key
every lookup uses.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from backend.inputs import whole_number
from backend.labelstudio.access import LabelStudioAccess
from backend.options import OptionValue
from backend.storage.shared_store import SharedStore, StoreError

log = logging.getLogger(__name__)


def project_id(project: object) -> str | None:
    """The project's id from ``"12.1700000000"``, ``"12"``, ``12`` or ``{"id": 12}``; None when there is none."""
    value = project.get("id") if isinstance(project, Mapping) else project
    if isinstance(value, bool) or value is None:
        return None
    text = str(value).strip().split(".")[0]
    return text if whole_number(text) is not None else None


@dataclass(frozen=True)
class ProjectSetup:
    """A project's label config, option changes and Label Studio access, as /setup gave them."""

    schema: str | None = None
    options: dict[str, OptionValue] = field(default_factory=dict)
    access: LabelStudioAccess = LabelStudioAccess()

    def to_json(self) -> bytes:
        return json.dumps({"schema": self.schema, "options": self.options,
                           "hostname": self.access.url, "access_token": self.access.api_key}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ProjectSetup:
        value = json.loads(data)
        return cls(value.get("schema"), dict(value.get("options") or {}),
                   LabelStudioAccess(value.get("hostname"), value.get("access_token")))


class ProjectStore:
    """Project setups by id in a ``SharedStore`` (keys ``projects:<id>``)."""

    def __init__(self, store: SharedStore) -> None:
        self.store = store

    def save(self, project: object, setup: ProjectSetup) -> None:
        """Keep ``setup`` for the project; raises StoreError when the store is unreachable."""
        self.store.put(f"projects:{self._key(project)}", setup.to_json())

    def delete(self, project: object) -> None:
        """Forget what /setup said of the project (deleted in Label Studio)."""
        self.store.delete(f"projects:{self._key(project)}")

    @staticmethod
    def _key(project: object) -> str:
        key = project_id(project)
        if key is None:
            raise ValueError(f"not a Label Studio project: {project!r}")
        return key

    def load(self, project: object) -> ProjectSetup:
        """What /setup said of the project; an empty setup when it said nothing or the store is unreachable."""
        try:
            return self.read(project)
        except StoreError as error:  # predictions go on with the request's own config
            log.warning("project %s: its setup could not be read, using the request alone: %s",
                        project_id(project), error)
            return ProjectSetup()

    def read(self, project: object) -> ProjectSetup:
        """What /setup said of the project (empty when nothing or unreadable); raises StoreError when the
        store is unreachable, for callers that wait for it rather than go on without (learning)."""
        key = project_id(project)
        if key is None:
            return ProjectSetup()
        data = self.store.get(f"projects:{key}")
        try:
            return ProjectSetup.from_json(data) if data else ProjectSetup()
        except (ValueError, TypeError, AttributeError) as error:
            log.warning("project %s: its stored setup is unreadable, using the request alone: %s", key, error)
            return ProjectSetup()
