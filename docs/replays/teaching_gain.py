"""What teaching each pool image next would gain, beside what could have predicted it (docs/quality.md, "Teaching gain").

An oracle for the confidence order: from a fixed memory (the first 0, 1 or 2 scenes taught), teach
each other pool scene in turn, score the held-out scenes, and rank the scenes by that gain next to
the backend's confidence and four other candidates. Run from the repository root::

    for seed in 0 1 2 3 4 5 6 7 8 9; do freesegdiff synthetic-scenes --out /tmp/n23/sc$seed --count 16 --seed $seed; done
    FREESEG_MODELS=tiny HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python docs/replays/teaching_gain.py /tmp/n23/gain.json \
        /tmp/n23/sc0 /tmp/n23/sc1 ... /tmp/n23/sc9

Each set: scenes 0 to 7 the pool, 8 to 15 held out, as ``eval --learn --holdout 8``. The candidates:
``score`` the prediction's confidence (what the confidence order sorts by, lowest first); ``novelty``
1 - the cell's mean cosine similarity to its ten nearest exemplars, averaged over the image (0 with
an empty memory); ``own_miou`` the prediction's own mIoU; and two that use the ground truth, which a
backend never has: ``classes`` the classes the scene shows, ``foreground`` its share of non-background.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from backend.evaluation.datasets import dataset_at
from backend.evaluation.replay import _miou, ground_truth_regions
from backend.images import read_image_file
from backend.storage.memory_store import memory_bounds
from backend.models.process import process_segmenter
from backend.pipeline.exemplars import NEIGHBOURS, Exemplars
from backend.pipeline.memory import Memory
from backend.pipeline.segmenter import Segmenter
from backend.pipeline.teaching import teach
from backend.pipeline.vocabulary import labels_from_names
from backend.settings import Settings, get_settings

POOL, HOLDOUT = 8, 8
PREFIXES = ([], [0], [0, 1])  # the scenes taught before the one whose gain is measured
CANDIDATES = ("score", "novelty", "own_miou", "classes", "foreground")


def novelty(features: np.ndarray, exemplars: Exemplars | None) -> float:
    """1 - each cell's mean similarity to its nearest exemplars, averaged over the cells."""
    if exemplars is None:
        return 0.0
    cells = features.reshape(features.shape[0], -1).T.astype(np.float32)
    cells /= np.linalg.norm(cells, axis=1, keepdims=True)
    nearest = np.sort(cells @ exemplars.matrix.T, axis=1)[:, -NEIGHBOURS:]
    return float(1 - nearest.mean())


def scene_set(segmenter: Segmenter, settings: Settings, root: Path) -> list[dict]:
    """Each prefix of ``PREFIXES``: every other pool scene's gain and candidate figures, in ``root``'s set."""
    spec = dataset_at("folder", root)
    samples = list(spec.samples(root, POOL + HOLDOUT))
    labels = labels_from_names(spec.label_names)
    options = settings.segment_options
    images = [read_image_file(sample.image_path) for sample in samples]
    encodings = segmenter.encode_many(images, 4)
    truths = [sample.label for sample in samples]
    held = range(POOL, POOL + HOLDOUT)

    def exemplars_of(taught: list[int]) -> Exemplars | None:
        if not taught:
            return None
        memory = Memory(segmenter.fingerprint, encodings[0].features.shape[0], memory_bounds(settings))
        for index in taught:
            regions, ignored = ground_truth_regions(truths[index], spec.label_names)
            teach(memory, samples[index].image_id, encodings[index], regions, ignored)
        return Exemplars.from_memory(memory)

    def held_out_miou(taught: list[int]) -> float:
        exemplars = exemplars_of(taught)
        predictions = [segmenter.segment(encodings[i], images[i], labels, options, exemplars).label_map for i in held]
        return _miou(spec, predictions, [truths[i] for i in held])

    results = []
    for prefix in PREFIXES:
        before, exemplars = held_out_miou(prefix), exemplars_of(prefix)
        rows = []
        for index in (index for index in range(POOL) if index not in prefix):
            predicted = segmenter.segment(encodings[index], images[index], labels, options, exemplars)
            truth = truths[index]
            rows.append({"scene": index, "gain": held_out_miou(prefix + [index]) - before, "score": predicted.score,
                         "novelty": novelty(encodings[index].features, exemplars),
                         "own_miou": _miou(spec, [predicted.label_map], [truth]),
                         "classes": len([value for value in np.unique(truth) if 0 < value < 255]),
                         "foreground": float(((truth > 0) & (truth < 255)).mean())})
        results.append({"set": root.name, "taught": prefix, "miou_before": before, "rows": rows})
        print(summary_line(results[-1]), flush=True)
    return results


def summary_line(result: dict) -> str:
    """One prefix's result: the gains of the lowest-score, mean and best pick, and each candidate's correlation."""
    rows = result["rows"]
    gains = np.array([row["gain"] for row in rows])
    lowest_score = min(rows, key=lambda row: (row["score"], row["scene"]))["gain"]
    correlations = {name: _spearman([row[name] for row in rows], gains) for name in CANDIDATES}
    return (f"{result['set']} after {result['taught']}: gain of the lowest score {lowest_score:+.2f}, of the mean "
            f"{gains.mean():+.2f}, of the best {gains.max():+.2f}; Spearman with gain "
            + " ".join(f"{name} {value:+.2f}" for name, value in correlations.items()))


def _spearman(values: list[float], gains: np.ndarray) -> float:
    return float(spearmanr(values, gains).statistic) if len(set(values)) > 1 else float("nan")


if __name__ == "__main__":
    settings = get_settings()
    segmenter = process_segmenter(settings)
    Path(sys.argv[1]).write_text(json.dumps([result for root in sys.argv[2:]
                                             for result in scene_set(segmenter, settings, Path(root))], indent=1))
