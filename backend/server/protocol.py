"""The request bodies Label Studio sends (its ``ml/api_connector.py``), validated.

Unknown fields are allowed: Label Studio adds fields between versions, and a backend
that rejects them breaks on upgrade.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from backend.inputs import whole_number


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Task(_Open):
    id: int | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class PredictParams(_Open):
    login: str | None = None
    password: str | None = None
    context: dict[str, Any] | None = None


class PredictRequest(_Open):
    tasks: list[Task] = Field(max_length=1000)
    project: str | None = None
    label_config: str | None = None
    params: PredictParams | None = None


class SetupRequest(_Open):
    project: str | None = None
    schema_: str | None = Field(None, alias="schema")
    hostname: str | None = None
    access_token: str | None = Field(None, repr=False)
    extra_params: dict[str, Any] | None = None


class WebhookRequest(_Open):
    action: str | None = None
    project: dict[str, Any] | str | int | None = None
    task: dict[str, Any] | None = None
    annotation: dict[str, Any] | list[dict[str, Any]] | None = None  # a list for ANNOTATIONS_CREATED
    annotations: list[dict[str, Any]] | None = None  # ANNOTATIONS_DELETED: their ids
    tasks: list[dict[str, Any]] | None = None  # TASKS_DELETED: their ids


def listed_ids(objects: list[dict[str, Any]]) -> list[int]:
    """The ids of a webhook's tasks or annotations, those that are whole numbers ("²" or 5,000 digits are not)."""
    ids = (whole_number(item.get("id")) for item in objects if isinstance(item, dict))
    return [value for value in ids if value is not None]


class TrainRequest(_Open):
    """The older "Start Training" body (``/train``): ``project`` as ``"<id>.<created>"``, its annotations."""

    project: str | int | None = None
