"""Per-request pipeline options: their type and defaults, validated once, straight into typed values.

``SegmentOptions`` writes each option's default once; ``Settings`` takes them as the ``FREESEG_*``
defaults (``Settings.segment_options``). A project may change some of the pipeline's defaults: in
its label config (``model_k="5"`` on the BrushLabels tag), in /setup's ``extra_params`` (``{"k": 5}``)
or on the command line (``--k 5``). All three go through ``option_changes``, which returns the typed changes to
apply to a ``SegmentOptions`` (``{"k": 5, "use_caption": False}``) and names the attribute
of a value it refuses. Each option's range is written here once; ``Settings`` takes the
same ranges for the ``FREESEG_*`` defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, get_args

from backend.inputs import whole_number

RefineMethod = Literal["crf", "pamr", "none"]
REFINE_METHODS: tuple[str, ...] = get_args(RefineMethod)
# Which rules the stages follow: ours ("default") or the authors' released code's ("release");
# a process setting (FREESEG_FIDELITY, ``eval --fidelity``), not a per-request option: it picks a captioner
# and the text encoder that matches nouns to labels. backend.pipeline.fidelity names each stage's rule.
Fidelity = Literal["default", "release"]
FIDELITIES: tuple[str, ...] = get_args(Fidelity)
NounSource = Literal["spacy", "words"]  # FREESEG_NOUNS: the caption's nouns tagged by spaCy, or its words
K_RANGE = (2, 32)  # K-means clusters: fewer cannot separate anything, more make confetti of 32x32 cells
OptionValue = int | str | bool


@dataclass(frozen=True)
class SegmentOptions:
    """What a caller may change per request; these defaults are the ``FREESEG_*`` settings' defaults too."""

    k: int = 4
    refine: RefineMethod = "crf"
    use_caption: bool = True  # False: every label is a candidate (the paper's "no caption" ablation)
    caption_fallback: bool = True  # no candidate from the caption: take CLIP's best labels for the image
    seed: int = 0
    prompt: str = ""  # words an annotator typed: they pick the candidate labels instead of the caption


class OptionError(ValueError):
    """An option value this backend refuses; the message names the attribute or setting it came from."""

    kind = "options"


def option_changes(raw: Mapping[str, object], where: Callable[[str], str]) -> dict[str, OptionValue]:
    """The options ``raw`` sets (other keys are ignored), typed; ``where(name)`` names the source in errors.

    Strings, JSON numbers and booleans are accepted alike (``"5"``, ``5``; ``"True"``, ``true``).
    """
    as_text = {str(key).lower(): str(value).lower() if isinstance(value, bool) else str(value)
               for key, value in raw.items()}
    return {name: check(where(name), as_text[name]) for name, check in _CHECKS.items() if name in as_text}


def _whole_number_in(low: int, high: int) -> Callable[[str, str], int]:
    def check(attribute: str, raw: str) -> int:
        value = whole_number(raw)
        if value is None or not low <= value <= high:
            shown = raw if len(raw) <= 40 else f"{raw[:40]}..."
            raise OptionError(f'{attribute}="{shown}" must be a whole number from {low} to {high}')
        return value

    return check


def _one_of(*allowed: str) -> Callable[[str, str], str]:
    def check(attribute: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise OptionError(f'{attribute}="{raw}" must be one of {", ".join(allowed)}')
        return value

    return check


def _boolean(attribute: str, raw: str) -> bool:
    return _one_of("true", "false")(attribute, raw) == "true"


_CHECKS: dict[str, Callable[[str, str], OptionValue]] = {
    "k": _whole_number_in(*K_RANGE),
    "refine": _one_of(*REFINE_METHODS),
    "use_caption": _boolean,
    "caption_fallback": _boolean,
}
