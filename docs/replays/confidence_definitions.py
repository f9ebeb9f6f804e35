"""The ordered replay under other definitions of the confidence (docs/quality.md, "Other confidence definitions").

Run from the repository root, after writing the scenes as "Teaching in confidence order" does::

    for seed in 0 1 2 3 4; do freesegdiff synthetic-scenes --out /tmp/c23/s$seed --count 16 --seed $seed; done
    for seed in 0 1 2 3 4; do
      FREESEG_MODELS=tiny HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python docs/replays/confidence_definitions.py \
        /tmp/c23/s$seed current:confidence memory:dataset memory:confidence weakest:dataset weakest:confidence
    done

Each run writes ``r-<definition>-<order>.json`` (``eval --learn --holdout 8``'s JSON) beside the scenes.
The definitions, swapped into ``backend.pipeline.confidence`` here only, to be compared:
``current`` the backend's (a cell m * (1 + a) / 2, an untaught label's m / 2, the image the mean);
``memory`` a cell m * a, an untaught label's 0 (only the memory's evidence counts, so the image's
confidence is (1 - share under untaught labels) times the taught cells' mean m * a); ``weakest``
the same cells, the image its least sure region (the unlabelled cells one region).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

import backend.pipeline.confidence as confidence
import backend.pipeline.exemplars as exemplars
from backend.evaluation.datasets import dataset_at
from backend.evaluation.replay import replay
from backend.storage.memory_store import memory_bounds
from backend.models.process import process_segmenter
from backend.settings import get_settings

HOLDOUT = 8


def margin(scores: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    cells = np.arange(len(chosen))
    others = scores.copy()
    others[cells, chosen] = -np.inf
    second = others.max(axis=1) if scores.shape[1] > 1 else np.zeros(len(chosen))
    return np.clip(scores[cells, chosen] - second, 0.0, 1.0)


def memory_cells(scores, chosen, agreement, taught):
    """m * a for a taught label, 0 for an untaught one."""
    return (margin(scores, chosen) * np.where(taught, np.clip(agreement, 0.0, 1.0), 0.0)).astype(np.float32)


def weakest_region(cls, cells, region_cells):
    """Regions as the backend's; the image its least sure region, the unlabelled cells counted as one."""
    regions = tuple(float(cells[chosen].mean()) if chosen.any() else 0.0 for chosen in region_cells)
    labelled = np.zeros(len(cells), bool)
    for chosen in region_cells:
        labelled |= chosen
    parts = list(regions) + ([float(cells[~labelled].mean())] if (~labelled).any() else [])
    return cls(regions, min(parts) if parts else 0.0)


DEFINITIONS = {
    "current": (confidence.cell_confidence, confidence.Confidence.of_cells.__func__),
    "memory": (memory_cells, confidence.Confidence.of_cells.__func__),
    "weakest": (memory_cells, weakest_region),
}


def use(name: str) -> None:
    cells, of_cells = DEFINITIONS[name]
    confidence.cell_confidence = exemplars.cell_confidence = cells
    confidence.Confidence.of_cells = classmethod(of_cells)


def main(root: Path, runs: list[str]) -> None:
    settings = get_settings()
    segmenter = process_segmenter(settings)
    encoded, encode_many = {}, segmenter.encode_many

    def cached(images, batch=4):  # the same scenes every run: encode once
        if "encodings" not in encoded:
            encoded["encodings"] = encode_many(images, batch)
        return encoded["encodings"]

    segmenter.encode_many = cached
    spec = dataset_at("folder", root)
    samples = list(spec.samples(root, None))
    for run in runs:
        name, order = run.split(":")
        use(name)
        start = time.time()
        result = replay(segmenter, spec, samples, settings.segment_options, memory_bounds(settings),
                        order, HOLDOUT).to_dict()
        result |= {"definition": name, "seconds": time.time() - start}
        (root / f"r-{name}-{order}.json").write_text(json.dumps(result, indent=1))
        print(root.name, name, order, [(c["taught"], round(c["miou_with"], 2)) for c in result["checkpoints"]],
              flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
