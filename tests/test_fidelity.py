"""FREESEG_FIDELITY=release: each of the released code's rules on small fixed inputs, then the whole
product (``/predict``, ``segment``, ``eval``) under it with the tiny profile.

Expected outputs are worked out by hand from the released code (bcorrad/FreeSegDiff-release:
``BLIPcaptioner.py`` for nouns and candidates, ``segment.py`` for the mask naming, ``pamr.py``
for PAMR's binarisation), as the comments beside them show.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pytest
import spacy
import torch
from spacy.tokens import Doc

from backend.cli import main
from backend.models.identity import models_fingerprint
from backend.pipeline.caption import OURS, RELEASE, Captioner
from backend.pipeline.candidates import (
    ClipCandidates,
    ReleaseCandidates,
    caption_nouns,
    correlation_distances,
    release_caption_nouns,
)
from backend.pipeline.labelling import BARE_NAMES_CROPPED, PROMPTS_PADDED, cluster_label_scores
from backend.pipeline.refine import above_half, above_half_of_peak, refine_masks
from backend.pipeline.vocabulary import Label
from backend.settings import Settings
from tests.app_client import image_tasks, predict, ready_client
from tests.fakes import WordVectorEmbedder
from tests.test_eval_cli import _voc
from tests.test_server import BRUSH_CONFIG

PERSON, DOG = [1, -1, 0, 0], [0, 0, 1, -1]  # "A photo of person", "A photo of dog": uncorrelated
NEAR_PERSON = [1, -1, 0.3, -0.3]  # correlation distance to PERSON 0.0422, to DOG 0.7127
NEAR_DOG = [0.5, -0.5, 1, -1]  # to DOG 0.1056, to PERSON 0.5528
UNCORRELATED = [1, 1, -1, -1]  # 1.0 to both: its nearest is the first class


class TablePooler:
    """Stable Diffusion's pooled text embeddings, from a table; it records what it was asked."""

    def __init__(self, table: dict[str, Sequence[float]]):
        self.table = table
        self.asked: list[str] = []

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.asked += texts
        return np.array([self.table[text] for text in texts], np.float64)


def _release_pooler(**nouns: Sequence[float]) -> TablePooler:
    return TablePooler({"A photo of person": PERSON, "A photo of dog": DOG, **nouns})


LABELS = [Label("person"), Label("dog")]


def test_correlation_distance_is_one_minus_pearson():
    distances = correlation_distances(np.array([NEAR_PERSON, NEAR_DOG, UNCORRELATED]), np.array([PERSON, DOG]))
    np.testing.assert_allclose(distances, [[0.04217, 0.71265], [0.55279, 0.10557], [1.0, 1.0]], atol=1e-5)


def test_release_candidates_without_an_exact_name_keep_the_nouns_at_most_the_mean_distance():
    pooler = _release_pooler(woman=NEAR_PERSON, puppy=NEAR_DOG, grass=UNCORRELATED)
    # woman -> person 0.0422, puppy -> dog 0.1056, grass -> person 1.0; mean 0.3826: grass alone is too far
    assert ReleaseCandidates(pooler)(["woman", "puppy", "grass"], LABELS) == [0, 1]
    assert pooler.asked == ["woman", "puppy", "grass", "A photo of person", "A photo of dog"]  # bare nouns


def test_release_candidates_give_an_exact_name_no_shortcut():
    pooler = _release_pooler(man=NEAR_PERSON, dog=NEAR_DOG)
    # "a man walking a dog": the bare "dog" is 0.1056 from "A photo of dog", above the mean 0.0739 of
    # man's 0.0422 and its own: the noun that names a label exactly is dropped, person is kept
    assert ReleaseCandidates(pooler)(["man", "dog"], LABELS) == [0]


def test_our_exact_match_shortcut_loses_person_beside_an_exact_dog():
    clip = WordVectorEmbedder({"person": [1, 0, 0], "dog": [0, 1, 0], "man": [0.8, 0.2, 0.3]}, dimensions=3)
    # ours: dog is a candidate outright and counts 0 in the mean, so man (nearest person) is farther than it
    assert ClipCandidates(clip)(["man", "dog"], LABELS) == [1]


def test_release_candidates_average_the_words_of_a_class_and_its_synonyms():
    pooler = TablePooler({"A photo of tv": [1, -1, 0, 0], "A photo of monitor": [0, 0, 1, -1],
                          "A photo of screen": [1, -1, 1, -1], "A photo of dog": DOG, "telly": [1, -1, 0.5, -0.5]})
    # the class vector is the mean of its three prompts, [2, -2, 2, -2] / 3: telly's nearest, alone: kept
    assert ReleaseCandidates(pooler)(["telly"], [Label("dog"), Label("tv monitor", synonyms=("screen",))]) == [1]
    assert "A photo of tv monitor" not in pooler.asked and "A photo of screen" in pooler.asked


def test_release_candidates_of_no_noun_are_none():
    assert ReleaseCandidates(_release_pooler())([], LABELS) == []


def _caption_doc() -> Doc:
    """ "small dogs near a red car while sky is blue", tagged and parsed by hand (a fixed input, no tagger)."""
    words = ["small", "dogs", "near", "a", "red", "car", "while", "sky", "is", "blue"]
    return Doc(
        spacy.blank("en").vocab, words=words,
        pos=["ADJ", "NOUN", "ADP", "DET", "ADJ", "NOUN", "SCONJ", "NOUN", "AUX", "ADJ"],
        heads=[1, 1, 1, 5, 5, 2, 8, 8, 1, 8],
        deps=["amod", "ROOT", "prep", "det", "amod", "pobj", "mark", "nsubj", "advcl", "acomp"],
        lemmas=["small", "dog", "near", "a", "red", "car", "while", "sky", "be", "blue"],
    )


def test_release_nouns_take_any_adjectives_head_and_keep_repeats():
    doc = _caption_doc()
    # small -> its head "dogs", dogs, red -> "car", car, sky, blue -> its head "is" (an AUX, and a stop word);
    # the text of each, not its lemma; "while" and "is" are stop words, "near" and "a" not nouns
    assert release_caption_nouns(lambda caption: doc, "") == ["dogs", "dogs", "car", "car", "sky", "is"]
    # ours: lemmas, only a NOUN head, each once
    assert caption_nouns(lambda caption: doc, "") == ["dog", "car", "sky"]


class ColourOracle:
    """CLIP as a test sees it: a text's vector from a table; an image is "cat" when any pixel is lit."""

    def __init__(self, table: dict[str, Sequence[float]]):
        self.table = table
        self.images: list[np.ndarray] = []

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return np.array([self.table[text] for text in texts], np.float32)  # unknown texts fail the test

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        self.images += images
        return np.array([[1.0, 0.0] if image.any() else [0.0, 1.0] for image in images], np.float32)


def test_release_naming_scores_bare_names_on_the_centre_crop():
    clip = ColourOracle({"cat": [1, 0], "dog": [0, 1], "a photo of a cat.": [1, 0], "a photo of a kitty.": [1, 0],
                         "a photo of a dog.": [0, 1]})
    labels = [Label("cat", synonyms=("kitty",)), Label("dog")]
    image = np.full((2, 4, 3), 200, np.uint8)
    masks = np.zeros((1, 2, 4), bool)
    masks[0, :, 0] = True  # a cluster on the left edge of a wide image

    ours = cluster_label_scores(clip, [image], [masks], PROMPTS_PADDED.label_vectors(clip, labels))[0]
    release_vectors = BARE_NAMES_CROPPED.label_vectors(clip, labels)  # texts "cat", "dog": no other text known
    release = cluster_label_scores(clip, [image], [masks], release_vectors, BARE_NAMES_CROPPED.view)[0]

    np.testing.assert_allclose(release_vectors, [[1, 0], [0, 1]])
    assert ours[0].argmax() == 0 and release[0].argmax() == 1  # the crop (columns 1-2) lost every cluster pixel
    assert [shown.shape for shown in clip.images] == [(2, 4, 3), (2, 2, 3)]
    np.testing.assert_allclose(release[0], [0, 1], atol=1e-6)  # softmax(100 * [0, 1]): e^-100 is nothing


def test_release_pamr_divides_each_soft_mask_by_its_maximum():
    soft = torch.tensor([[[0.1, 0.3], [0.2, 0.4]], [[0.0, 0.0], [0.0, 0.0]]])
    # 0.3 / (0.4 + 1e-5) = 0.74999 stays; 0.2 / 0.40001 = 0.49999 is just under 0.5; an empty mask stays empty
    assert above_half_of_peak(soft).tolist() == [[[False, True], [False, True]], [[False, False], [False, False]]]
    assert not above_half(soft).any()  # ours: nothing reaches 0.5
    assert above_half_of_peak(torch.tensor([[[0.25, 0.5]]])).tolist() == [[[False, True]]]  # 0.25 / 0.50001 < 0.5


def test_release_pamr_keeps_a_region_that_pamr_fades_below_half():
    image = np.full((40, 40, 3), 120, np.uint8)  # flat: PAMR spreads the seed evenly over its 48 neighbours
    masks = np.zeros((1, 40, 40), bool)
    masks[0, 18:22, 18:22] = True
    assert not refine_masks(image, masks, "pamr").any()
    released = refine_masks(image, masks, "pamr", pamr_threshold=above_half_of_peak)
    assert released[0, 18:22, 18:22].all()


def test_release_captions_count_blips_prompt_in_their_30_tokens(tiny_release):
    # [BOS] a picture of: 4 tokens after generate() drops the prompt's [SEP]; the processor's input is 5 long
    assert (OURS.blip_max_length(5), RELEASE.blip_max_length(5)) == (35, 30)
    captioner = tiny_release.captioner
    assert isinstance(captioner, Captioner) and captioner.length == RELEASE
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    caption = captioner([image])[0]
    assert 0 < len(caption.split()) <= 30 - 4  # the word-level tiny tokenizer: one token a word


def test_release_settings_pick_blip_and_refuse_blip2(tmp_path):
    release = Settings(models="tiny", fidelity="release", model_dir=tmp_path)
    assert release.captioner == "blip"
    assert models_fingerprint(release, torch.float32) != models_fingerprint(
        Settings(models="tiny", captioner="blip", model_dir=tmp_path), torch.float32)  # its captions differ
    with pytest.raises(ValueError, match="FREESEG_FIDELITY=release.*FREESEG_CAPTIONER=blip2"):
        Settings(models="tiny", fidelity="release", captioner="blip2")
    assert Settings(models="tiny", model_dir=tmp_path).with_fidelity("release").captioner == "blip"


@pytest.fixture(scope="module")
def release_settings(tiny_settings) -> Settings:
    return tiny_settings.with_fidelity("release")


@pytest.fixture(scope="module")
def tiny_release(release_settings):
    from backend.models.process import process_segmenter

    return process_segmenter(release_settings)


def test_release_settings_give_every_stage_its_release_rule(tiny_release, tiny_segmenter):
    rules = tiny_release.rules
    assert isinstance(rules.candidates, ReleaseCandidates) and rules.nouns is release_caption_nouns
    assert rules.naming is BARE_NAMES_CROPPED and tiny_release.refiner.pamr_threshold is above_half_of_peak
    assert tiny_release.captioner.kind == "blip" and tiny_release.fingerprint != tiny_segmenter.fingerprint
    ours = tiny_segmenter.rules
    assert isinstance(ours.candidates, ClipCandidates) and ours.nouns is caption_nouns
    assert ours.naming is PROMPTS_PADDED and tiny_segmenter.refiner.pamr_threshold is above_half
    assert tiny_segmenter.captioner.length == OURS


def test_predict_runs_under_release_fidelity(release_settings, tiny_release, image_server):
    with ready_client(release_settings, lambda: tiny_release) as client:
        response = predict(client, image_tasks(f"{image_server}/china.jpg"), BRUSH_CONFIG, project="1.1")
    assert response.status_code == 200
    (prediction,) = response.json()["results"]
    assert prediction["model_version"].endswith("tiny-random-weights")
    assert {region["value"]["brushlabels"][0] for region in prediction["result"]} <= {"building", "tree", "Sky"}


def test_segment_runs_under_release_fidelity(tiny_environment, tmp_path, china):
    from PIL import Image

    tiny_environment.setenv("FREESEG_FIDELITY", "release")
    Image.fromarray(china).save(tmp_path / "china.png")
    assert main(["segment", str(tmp_path / "china.png"), "--labels", "building,tree,sky", "--refine", "pamr",
                 "--out", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "china.json").read_text())
    assert record["model_version"].endswith("tiny-random-weights") and (tmp_path / "out" / "china.png").is_file()


def test_eval_with_release_fidelity_prints_both_conventions(tmp_path, tiny_environment, capsys):
    root = tmp_path / "VOC2012"
    _voc(root, ["a"])
    assert main(["eval", "--dataset", "voc", "--root", str(root), "--json", str(tmp_path / "out.json"),
                 "--refine", "none", "--fidelity", "release"]) == 0
    result = json.loads((tmp_path / "out.json").read_text())
    printed = capsys.readouterr().out
    assert f"mIoU {result['miou']:.2f} (dataset-level, as mmsegmentation)" in printed
    assert f"authors' per-image mean {result['miou_per_image_release']:.2f}" in printed


def test_eval_with_release_fidelity_refuses_blip2_naming_both_settings(tmp_path, tiny_environment, caplog):
    tiny_environment.setenv("FREESEG_CAPTIONER", "blip2")
    root = tmp_path / "VOC2012"
    _voc(root, ["a"])
    assert main(["eval", "--dataset", "voc", "--root", str(root), "--json", str(tmp_path / "out.json"),
                 "--fidelity", "release"]) == 2
    assert "FREESEG_CAPTIONER=blip2" in caplog.text and "FREESEG_FIDELITY=release" in caplog.text
    assert not (tmp_path / "out.json").exists()
