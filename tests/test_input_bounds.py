"""Round two of hardening (issue 31): what one request may ask, bounded at the edge, and every crafted value a 400.

A typed prompt over FREESEG_MAX_PROMPT_CHARS or FREESEG_MAX_PROMPT_WORDS, a config over FREESEG_MAX_LABELS or
nested deeper than the SDK's parser takes, numbers of 5,000 digits, non-ASCII digits and integers beyond a
float: each gets a 400 naming what to change (or is skipped, for a webhook's ids), never a 500 or a held worker.
The app is driven over HTTP in-process with the tiny profile's real models and a loopback image host.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence

import pytest
from fastapi.testclient import TestClient

from backend.labelstudio.config import LabelConfigError, parse_label_config
from backend.pipeline.candidates import prompt_phrases, prompt_words
from backend.pipeline.vocabulary import Label
from backend.server.config_cache import LabelConfigCache
from backend.settings import Settings
from tests.app_client import image_tasks, predict, ready_client


def config(labels: Sequence[str] = ("Sky", "Tree", "building"), attributes: str = "", padding: str = "") -> str:
    return f"""<View>{padding}
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image" model_refine="none" {attributes}>
    {"".join(f'<Label value="{label}"/>' for label in labels)}
  </BrushLabels>
  <KeyPointLabels name="click" toName="image"><Label value="Sky"/></KeyPointLabels>
  <TextArea name="prompt" toName="image"/>
</View>"""


CONFIG = config()
ISSUE_PROMPT = "sofa cat dog tree house " * 4200  # issue 31's reproduction: 21,000 words, 105,000 characters
AT_THE_BOUND = " ".join(["skyscraper"] + ["buildings"] * 99)  # 1,000 characters, 100 words: the defaults


@pytest.fixture
def client(tiny_settings: Settings, tiny_segmenter, tmp_path) -> Iterator[TestClient]:
    settings = tiny_settings.model_copy(update={"model_dir": tmp_path})
    with ready_client(settings, lambda: tiny_segmenter) as client:
        yield client


def typed(text: str) -> dict:
    """/predict's params for a typed prompt."""
    return {"context": {"result": [{"type": "textarea", "from_name": "prompt", "to_name": "image",
                                    "value": {"text": [text]}}]}}


# --- defect 2: a typed prompt ----------------------------------------------------------------------


def test_the_issues_prompt_is_refused_at_once_naming_the_limit(client, image_server):
    started = time.monotonic()
    response = predict(client, image_tasks(f"{image_server}/china.jpg"), CONFIG, params=typed(ISSUE_PROMPT))
    seconds = time.monotonic() - started
    assert response.status_code == 400 and "FREESEG_MAX_PROMPT_CHARS" in response.json()["error"], response.text
    assert seconds < 5, f"the refusal took {seconds:.1f} s"


def test_a_prompt_of_too_many_short_words_is_refused_naming_the_limit(client, image_server):
    response = predict(client, image_tasks(f"{image_server}/china.jpg"), CONFIG,
                       params=typed("a " * 101))  # 202 characters, 101 words
    assert response.status_code == 400 and "FREESEG_MAX_PROMPT_WORDS" in response.json()["error"], response.text


def test_a_prompt_at_the_bound_is_answered(client, image_server):
    assert (len(AT_THE_BOUND), len(AT_THE_BOUND.split())) == (1000, 100)
    started = time.monotonic()
    response = predict(client, image_tasks(f"{image_server}/china.jpg"), CONFIG, params=typed(AT_THE_BOUND))
    print(f"\n/predict with a prompt at the bound: {time.monotonic() - started:.2f} s")
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["result"], "the prompt names a label: regions come back"


def old_prompt_words(prompt: str, labels: Sequence[Label]) -> list[str]:
    """prompt_words before issue 31: every n-gram of every phrase (cubic in the phrase's length)."""
    label_words = {word for label in labels for word in label.words}
    found: list[str] = []
    for phrase in prompt_phrases(prompt):
        words = phrase.split()
        ngrams = (" ".join(words[i: i + n]) for n in range(len(words), 0, -1) for i in range(len(words) - n + 1))
        found.extend([w for w in ngrams if w in label_words] or [phrase])
    return list(dict.fromkeys(found))


@pytest.mark.parametrize("prompt", [
    "a red car", "dog cat", "sailboat", "the traffic light, a fire hydrant and a dog", "A red car! And a dog.",
    "traffic light traffic", "hot dog stand; big traffic light pole", "", "cat, , and; car\nsky", "teddy bear's picnic",
])
def test_bounded_ngrams_name_what_every_ngram_named(prompt):
    labels = [Label("car"), Label("dog", ("hot dog",)), Label("cat"), Label("traffic light"),
              Label("fire hydrant", ("hydrant",)), Label("teddy bear's picnic"), Label("big traffic light pole")]
    assert prompt_words(prompt, labels) == old_prompt_words(prompt, labels)


def test_matching_a_long_phrase_is_not_cubic():
    labels = [Label(f"label {index} word") for index in range(300)] + [Label("house")]
    phrase = "sofa cat dog tree house " * 200  # 1,000 words: 6 s with every n-gram
    started = time.monotonic()
    assert prompt_words(phrase, labels) == ["house"]
    assert time.monotonic() - started < 0.5


# --- defect 3: labels per config ---------------------------------------------------------------------


def test_labels_over_the_bound_are_refused_at_setup_and_predict(client, image_server):
    too_many = config([f"label {index}" for index in range(301)])
    setup = client.post("/setup", json={"project": "1.1", "schema": too_many})
    assert setup.status_code == 400 and "FREESEG_MAX_LABELS" in setup.json()["error"], setup.text
    response = predict(client, image_tasks(f"{image_server}/china.jpg"), too_many)
    assert response.status_code == 400 and "FREESEG_MAX_LABELS" in response.json()["error"], response.text


def test_labels_at_the_bound_are_read_and_the_bound_is_a_parameter():
    assert len(parse_label_config(config([f"label {index}" for index in range(300)])).labels) == 300
    with pytest.raises(LabelConfigError, match="more than 2 labels"):
        parse_label_config(CONFIG, max_labels=2)


# --- defect 6: crafted values ------------------------------------------------------------------------


def test_a_config_nested_256_deep_is_a_400(client, image_server):
    deep = config(padding="<View>" * 256 + "</View>" * 256)
    for response in (client.post("/setup", json={"project": "1.1", "schema": deep}),
                     predict(client, image_tasks(f"{image_server}/china.jpg"), deep)):
        assert response.status_code == 400 and "not valid XML" in response.json()["error"], response.text


@pytest.mark.parametrize("k", ["9" * 5000, "²", "٣"])
def test_k_of_5000_digits_or_non_ascii_digits_is_a_400(client, image_server, k):
    with_k = config(attributes=f'model_k="{k}"')
    for response in (client.post("/setup", json={"project": "1.1", "schema": with_k}),
                     predict(client, image_tasks(f"{image_server}/china.jpg"), with_k),
                     client.post("/setup", json={"project": "1.1", "schema": CONFIG, "extra_params": {"k": k}})):
        assert response.status_code == 400 and "whole number from 2 to 32" in response.json()["error"], response.text


def test_a_json_number_of_5000_digits_is_a_400(client):
    body = '{"project": "1.1", "extra_params": {"k": ' + "9" * 5000 + "}}"
    response = client.post("/setup", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text


@pytest.mark.parametrize("x", ["1" + "0" * 400, "1e400", "-0.5", "100.5"])
def test_a_click_beyond_a_float_or_the_image_is_a_400(client, image_server, x):
    click = '{"type": "keypointlabels", "value": {"x": ' + x + ', "y": 5, "keypointlabels": ["Sky"]}}'
    body = ('{"tasks": [{"id": 1, "data": {"image": "' + image_server + '/china.jpg"}}], "label_config": '
            + json.dumps(CONFIG) + ', "params": {"context": {"result": [' + click + "]}}}")
    response = client.post("/predict", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "x from 0 to 100" in response.json()["error"], response.text


@pytest.mark.parametrize("annotation_id", ["²", "9" * 5000, "٣", " "])
def test_webhook_ids_that_are_no_whole_numbers_are_skipped(client, annotation_id, monkeypatch):
    submitted: list = []
    monkeypatch.setattr(client.app.state.learner, "submit", submitted.append)
    for body in ({"action": "ANNOTATION_CREATED", "project": {"id": 1}, "annotation": {"id": annotation_id}},
                 {"action": "ANNOTATIONS_DELETED", "project": {"id": 1}, "annotations": [{"id": annotation_id}]},
                 {"action": "TASKS_DELETED", "project": {"id": 1}, "tasks": [{"id": annotation_id}]},
                 {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "annotation": {"id": 12}}):
        response = client.post("/webhook", json=body)
        assert response.status_code == 200, response.text
    assert [(event.action, event.annotation_id) for event in submitted] == [("learn", 12)]


# --- defect 8: small ones ----------------------------------------------------------------------------


def test_memory_of_an_id_of_5000_digits_is_a_400_without_model_dir(client):
    response = client.get("/memory/" + "9" * 5000)
    assert response.status_code == 400 and response.json()["kind"] == "project", response.text[:300]
    assert str(client.app.state.memories.store.store.folder) not in response.text


def test_a_store_error_answers_503_without_model_dir(client):
    folder = client.app.state.memories.store.store.folder
    (folder / "memory").write_bytes(b"a file where the memories' folder belongs")
    response = client.get("/memory/7")
    assert response.status_code == 503 and response.json()["kind"] == "store", response.text
    assert str(folder) not in response.text and "MODEL_DIR" not in response.text


def test_head_on_health_answers_200_without_a_body(client):
    response = client.head("/health")
    assert response.status_code == 200 and response.content == b""


def test_twenty_configs_of_4_5_mb_do_not_all_stay_cached(client):
    padding = "<!--" + "x" * 4_500_000 + "-->"
    for index in range(20):
        padded = config([f"label {index}"], padding=padding)
        assert client.post("/setup", json={"project": "1.1", "schema": padded}).status_code == 200
    held = client.app.state.label_configs.held_bytes
    print(f"\nlabel-config cache after 20 configs of 4.5 MB: {held / 1e6:.1f} MB")
    assert 0 < held <= Settings().config_cache_bytes < 20 * 4_500_000


def test_the_config_cache_keeps_the_configs_used_last_within_its_bytes():
    parsed: list[str] = []

    def parse(xml: str):
        parsed.append(xml)
        return parse_label_config(CONFIG)

    cache = LabelConfigCache(parse, max_bytes=3_000)
    configs = [str(index) * 1_000 for index in range(4)]
    for xml in configs + configs[-2:]:
        cache(xml)
    assert parsed == configs, "the two used last were kept"
    assert cache.held_bytes <= 3_000
    cache("x" * 5_000)
    cache("x" * 5_000)
    assert parsed[-2:] == ["x" * 5_000] * 2, "one larger than the bound is parsed each time, never kept"
