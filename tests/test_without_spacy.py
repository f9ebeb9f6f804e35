"""FREESEG_NOUNS=words: the caption's words for nouns, and a pipeline that runs where spaCy is not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backend.pipeline.candidates import caption_words

ROOT = Path(__file__).resolve().parents[1]

# spaCy made unimportable, as on a machine without it; then the tiny segmenter predicts.
NO_SPACY_RUN = """
import json, sys
sys.modules["spacy"] = None
import numpy as np
from sklearn.datasets import load_sample_image
from backend.models.process import process_segmenter
from backend.options import SegmentOptions
from backend.pipeline.vocabulary import labels_from_names
from backend.settings import Settings
segmenter = process_segmenter(Settings(models="tiny", device="cpu", nouns="words", model_dir=sys.argv[1]))
segmentation = segmenter.segment_image(load_sample_image("china.jpg"), labels_from_names(["sky", "temple", "tree"]),
                                       SegmentOptions(refine="none"))
print(json.dumps({"nlp": segmenter.nlp is None, "regions": len(segmentation.regions),
                  "spacy": sys.modules.get("spacy") is not None}))
"""


def test_the_words_of_a_caption_without_stop_words_each_once():
    assert caption_words(None, "A dog and a Dog, sitting on the grass-covered hill!") == [
        "dog", "sitting", "grass-covered", "hill"]
    assert caption_words(None, "") == []


@pytest.mark.slow
def test_the_pipeline_runs_without_spacy(tiny_settings):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", NO_SPACY_RUN, str(tiny_settings.model_dir)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    ran = json.loads(result.stdout.strip().splitlines()[-1])
    assert ran == {"nlp": True, "regions": ran["regions"], "spacy": False} and ran["regions"] > 0
