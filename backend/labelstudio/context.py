"""Interactive pre-annotation: what the annotator just did, from /predict's ``context``.

Label Studio sends the regions the annotator just made: a KeyPointLabels click (``x``,
``y`` in percent of the image, and its label), or the text of a TextArea. A click asks
for the region under the point with the click's label; typed words steer the candidate
labels (see README, "Interactive pre-annotation"). Labels are matched to the config's by
name or synonym, case-insensitively; results always carry the config's own label.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from backend.labelstudio.config import LabelConfigError, ProjectVocabulary


@dataclass(frozen=True)
class PercentClick:
    x: float  # percent of the image width
    y: float  # percent of the image height
    label: int  # index into the vocabulary's labels


@dataclass(frozen=True)
class Interaction:
    clicks: tuple[PercentClick, ...] = ()
    text: str = ""


def parse_context(context: Mapping[str, Any] | None, vocabulary: ProjectVocabulary) -> Interaction | None:
    """The clicks and typed text in ``context``, or None when it holds neither."""
    clicks: list[PercentClick] = []
    texts: list[str] = []
    for region in (context or {}).get("result") or []:
        kind = str(region.get("type", "")).lower()
        value = region.get("value") or {}
        if kind == "keypointlabels":
            names = value.get("keypointlabels") or []
            if not names:
                raise LabelConfigError("a KeyPointLabels click without a label: pick a label before clicking")
            clicks.append(PercentClick(float(value["x"]), float(value["y"]), _label_index(names[0], vocabulary)))
        elif kind == "textarea" and region.get("from_name") == vocabulary.text_prompt_from_name:
            texts.extend(str(t) for t in value.get("text") or [])
    if not clicks and not texts:
        return None
    return Interaction(clicks=tuple(clicks), text=" ".join(texts))


def _label_index(name: str, vocabulary: ProjectVocabulary) -> int:
    wanted = name.strip().lower()
    for index, label in enumerate(vocabulary.labels):
        if wanted in label.words:
            return index
    known = ", ".join(label.name for label in vocabulary.labels)
    raise LabelConfigError(f"click label '{name}' is not a label of {vocabulary.from_name} ({known})")
