"""Interactive pre-annotation: what the annotator just did, from /predict's ``context``.

Label Studio sends the regions the annotator just made: a KeyPointLabels click (``x``,
``y`` in percent of the image, and its label), or the text of a TextArea. A click asks
for the region under the point with the click's label; typed words steer the candidate
labels (see docs/label-studio.md, "Interactive pre-annotation"). Labels are matched to the config's by
name or synonym, case-insensitively; results always carry the config's own label.

The context is free-form JSON in the request, so every part of it is checked here and
anything unreadable is a ``ContextError`` (a 400 naming the part), never a crash. A typed
prompt is bounded in characters and words (``PromptLimits``): the words are matched to the
labels on the only inference thread, so an unbounded prompt would hold every prediction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from backend.inputs import finite_number
from backend.inputs import PromptLimits
from backend.labelstudio.config import ProjectVocabulary


class ContextError(ValueError):
    """An interactive context this backend cannot read; the message names the part to fix."""


@dataclass(frozen=True)
class PercentClick:
    x: float  # percent of the image width
    y: float  # percent of the image height
    label: int  # index into the vocabulary's labels


@dataclass(frozen=True)
class Interaction:
    clicks: tuple[PercentClick, ...] = ()
    text: str = ""


def parse_context(context: Mapping[str, Any] | None, vocabulary: ProjectVocabulary,
                  limits: PromptLimits) -> Interaction | None:
    """The clicks and typed text in ``context``, or None when it holds neither; a prompt over ``limits`` is refused."""
    clicks: list[PercentClick] = []
    texts: list[str] = []
    for region in _regions(context):
        kind = str(region.get("type", "")).lower()
        value = region.get("value") or {}
        if not isinstance(value, Mapping):
            raise ContextError(f"a {kind or 'context'} region's value must be an object")
        if kind == "keypointlabels":
            clicks.append(_click(value, vocabulary))
        elif kind == "textarea" and region.get("from_name") == vocabulary.text_prompt_from_name:
            texts.extend(_texts(value.get("text")))
    if not clicks and not texts:
        return None
    return Interaction(clicks=tuple(clicks), text=_bounded_prompt(" ".join(texts), limits))


def _bounded_prompt(text: str, limits: PromptLimits) -> str:
    if len(text) > limits.max_chars:
        raise ContextError(f"the typed prompt has {len(text)} characters, over the limit of {limits.max_chars} "
                           "(FREESEG_MAX_PROMPT_CHARS)")
    words = len(text.split())
    if words > limits.max_words:
        raise ContextError(f"the typed prompt has {words} words, over the limit of {limits.max_words} "
                           "(FREESEG_MAX_PROMPT_WORDS)")
    return text


def _regions(context: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    regions = (context or {}).get("result") or []
    if not isinstance(regions, list) or not all(isinstance(region, Mapping) for region in regions):
        raise ContextError("params.context.result must be a list of regions (objects)")
    return regions


def _click(value: Mapping[str, Any], vocabulary: ProjectVocabulary) -> PercentClick:
    names = value.get("keypointlabels")
    if not names or not isinstance(names, list) or not isinstance(names[0], str):
        raise ContextError("a KeyPointLabels click without a label: pick a label before clicking")
    return PercentClick(_percent(value, "x"), _percent(value, "y"), _label_index(names[0], vocabulary))


def _percent(value: Mapping[str, Any], axis: str) -> float:
    """A click coordinate: a number from 0 to 100 (percent of the image)."""
    raw = value.get(axis)
    number = finite_number(raw)
    if number is None or not 0 <= number <= 100:
        raise ContextError(f"a KeyPointLabels click needs {axis} from 0 to 100 (percent of the image), got {repr(raw)[:40]}")
    return number


def _texts(text: object) -> list[str]:
    """A TextArea's lines: Label Studio sends a list of strings; a lone string is one line."""
    if isinstance(text, str):
        return [text]
    if text is None:
        return []
    if not isinstance(text, list):
        raise ContextError("a TextArea region's text must be a list of strings")
    return [str(line) for line in text]


def _label_index(name: str, vocabulary: ProjectVocabulary) -> int:
    wanted = name.strip().lower()
    for index, label in enumerate(vocabulary.labels):
        if wanted in label.words:
            return index
    known = ", ".join(label.name for label in vocabulary.labels)
    raise ContextError(f"click label '{name}' is not a label of {vocabulary.from_name} ({known})")
