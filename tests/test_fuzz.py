"""Fuzzing the server from its own OpenAPI schema: no answer in the 5xx range but 503.

schemathesis generates requests for every operation of ``/openapi.json``, valid and
invalid (positive and negative modes), against the app in-process: once with the models
loading (where /predict answers 503), once with them ready. A third run sends /predict
bodies with a valid label config and generated tasks and interactive contexts, which
the schema alone almost never reaches. Runs are deterministic (derandomized). Image
hosts are restricted to one that nothing generated names, so no request leaves the process.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from backend.server.app import create_app

EXAMPLES_PER_APP = 400
PREDICT_EXAMPLES = 300
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Sky" predicted_values="heaven"/><Label value="Tree"/></BrushLabels>
  <KeyPointLabels name="click" toName="image"><Label value="Sky"/></KeyPointLabels>
  <TextArea name="prompt" toName="image"/>
</View>"""
URL_PREFIXES = ["", "http://", "https://", "http://[", "http://127.0.0.1:1/", "s3://bucket/", "gs://", "/data/upload/",
                "/data/local-files/?d=", "data:", "data:image/png;base64,", "ftp://", "file:///"]
FUZZ_SETTINGS = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


def ok_except_busy(status: int) -> bool:
    return status < 500 or status == 503


@pytest.fixture(scope="module")
def statuses(pytestconfig) -> Iterator[Counter]:
    """(operation, status) -> count over the module; written to the terminal at its end: the fuzzing's figures."""
    counts: Counter = Counter()
    yield counts
    by_status: Counter = Counter()
    for (_, status), count in counts.items():
        by_status[status] += count
    with pytestconfig.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print(f"\nschemathesis: {sum(counts.values())} requests, by status {dict(sorted(by_status.items()))}")
        for (operation, status), count in sorted(counts.items()):
            print(f"  {operation}: {status} x {count}")


@pytest.fixture(scope="module")
def fuzz_settings(tiny_settings):
    # Only an image host that nothing generated names: any other http(s) URL is refused before DNS.
    return tiny_settings.model_copy(update={"allowed_url_hosts": ("images.invalid",), "allow_private_urls": False})


@pytest.fixture
def ready_app(fuzz_settings, tiny_segmenter):
    """The app with its models loaded; schemathesis starts it, and stops it after the test."""
    app = create_app(fuzz_settings, load_segmenter=lambda: tiny_segmenter)
    wait_ready(app)
    return app


def fuzz_every_operation(app, statuses: Counter, examples: int) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))

    @settings(FUZZ_SETTINGS, max_examples=examples)
    @given(case=cases)
    def check(case) -> None:
        response = case.call()
        statuses[(case.operation.label, response.status_code)] += 1
        assert ok_except_busy(response.status_code), (case.operation.label, case.body, response.text[:500])

    check()


def fuzz_predict_bodies(app, statuses: Counter, examples: int) -> None:
    operation = schemathesis.openapi.from_asgi("/openapi.json", app)["/predict"]["POST"]

    @settings(FUZZ_SETTINGS, max_examples=examples)
    @given(body=predict_bodies)
    def check(body: dict) -> None:
        response = operation.Case(body=body, media_type="application/json").call()
        statuses[("POST /predict (valid config)", response.status_code)] += 1
        assert ok_except_busy(response.status_code), (body, response.text[:500])

    check()


def wait_ready(app) -> None:
    schemathesis.openapi.from_asgi("/openapi.json", app)  # starts the app's lifespan: its models load
    deadline = time.monotonic() + 60
    while app.state.worker.state != "ready":
        assert time.monotonic() < deadline, "models did not become ready"
        time.sleep(0.05)


def test_no_5xx_but_503_while_the_models_load(fuzz_settings, tiny_segmenter, statuses):
    loaded = threading.Event()
    no_wait = fuzz_settings.model_copy(update={"load_wait_seconds": 0})  # a 503 at once, not after the load wait
    app = create_app(no_wait, load_segmenter=lambda: loaded.wait(300) and tiny_segmenter)
    try:
        fuzz_every_operation(app, statuses, EXAMPLES_PER_APP // 2)
        fuzz_predict_bodies(app, statuses, PREDICT_EXAMPLES // 3)
    finally:
        loaded.set()  # before schemathesis stops the app, which waits for its worker
    assert statuses[("POST /predict (valid config)", 503)] > 0, "no /predict body reached the models' check"


def test_no_5xx_once_the_models_are_ready(ready_app, statuses):
    fuzz_every_operation(ready_app, statuses, EXAMPLES_PER_APP)
    schema = schemathesis.openapi.from_asgi("/openapi.json", ready_app)
    operations = {label for label, _ in statuses}
    assert {op.ok().label for op in schema.get_all_operations()} <= operations


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
any_text = st.text(st.characters(codec=None, categories=None), max_size=40)  # lone surrogates included
image_urls = st.builds(lambda prefix, rest: prefix + rest, st.sampled_from(URL_PREFIXES), any_text)
click_values = st.fixed_dictionaries({}, optional={
    "keypointlabels": st.lists(st.sampled_from(["Sky", "heaven", "Dragon"]) | any_text, max_size=2) | json_values,
    "x": st.floats(-10, 110) | json_values,
    "y": st.floats(-10, 110) | json_values,
    "text": st.lists(any_text, max_size=2) | json_values,
})
regions = st.fixed_dictionaries(
    {"type": st.sampled_from(["keypointlabels", "KeyPointLabels", "textarea", "brushlabels"]) | st.text(max_size=8),
     "from_name": st.sampled_from(["prompt", "click", "tag"]) | any_text},
    optional={"value": click_values | json_values},
)
task_data = st.fixed_dictionaries({}, optional={"image": image_urls | json_values}) | json_values
tasks = st.lists(
    st.fixed_dictionaries({}, optional={"id": st.integers(-(2**40), 2**70) | json_values, "data": task_data}),
    max_size=4,
)
contexts = st.fixed_dictionaries({}, optional={"result": st.lists(regions, max_size=3) | json_values})
predict_bodies = st.fixed_dictionaries(
    {"tasks": tasks, "label_config": st.just(CONFIG)},
    optional={"project": any_text, "params": st.fixed_dictionaries({}, optional={"context": contexts})},
)


def test_no_5xx_for_predict_bodies_with_a_valid_config(ready_app, statuses):
    fuzz_predict_bodies(ready_app, statuses, PREDICT_EXAMPLES)
    answered = {status for (label, status) in statuses if label == "POST /predict (valid config)"}
    assert {200, 400} <= answered, "the generated bodies should reach both predictions and refusals"
