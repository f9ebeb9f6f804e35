"""How much one request may ask of the pipeline, beyond its bytes: labels per config, a typed prompt's size.

Both are worked through on the only inference thread for every task, so an unbounded one holds
every prediction behind it. ``Settings`` takes its defaults from here (FREESEG_MAX_LABELS,
FREESEG_MAX_PROMPT_CHARS, FREESEG_MAX_PROMPT_WORDS).
"""

from __future__ import annotations

from dataclasses import dataclass

# Every label is a CLIP prompt and a score per cluster on every task: 2,000 labels took 98 s for one task.
# Label Studio's largest segmentation template (ADE20K) has 150.
MAX_LABELS = 300


@dataclass(frozen=True)
class PromptLimits:
    """A typed prompt's bounds: far above what a person types, far below what would hold the worker."""

    max_chars: int = 1000
    max_words: int = 100
