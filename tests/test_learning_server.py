"""Learning in the server: only what Label Studio holds is learned, per project, kept and shared.

Label Studio is a loopback stand-in (``tests.fake_labelstudio``) answering the SDK's calls; the
models are the tiny profile's. The webhook payloads name annotations, and sometimes lie about them.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from label_studio_sdk.converter.brush import decode_rle

from backend.cli import main
from backend.pipeline.memory import UNLABELED
from backend.server.app import create_app
from backend.storage.shared_store import FileStore, RedisStore
from tests.fake_labelstudio import TOKEN, UPDATED_AT, FakeLabelStudio, data_uri, polygon
from tests.app_client import image_tasks, predict, wait_until_ready

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="rust"/><Label value="lesion"/></BrushLabels>
</View>"""
LEFT = [(0, 0), (50, 0), (50, 100), (0, 100)]
RIGHT = [(50, 0), (100, 0), (100, 100), (50, 100)]
WHOLE = [(0, 0), (100, 0), (100, 100), (0, 100)]


def _image(seed: int = 0) -> np.ndarray:
    """A dark blue left half (rust), a yellow right half (lesion), with seeded noise.

    Flat colours, not the synthetic scenes' textures: the tiny profile's random features tell
    colours apart but textures only weakly, and these tests are about the mechanism.
    """
    rng = np.random.default_rng(seed)
    halves = np.concatenate([np.full((96, 64, 3), (20, 30, 160)), np.full((96, 64, 3), (240, 230, 40))], axis=1)
    return np.clip(halves + rng.normal(scale=4.0, size=halves.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def fake():
    with FakeLabelStudio() as fake:
        fake.projects = {1: CONFIG, 2: CONFIG}
        uri = data_uri(_image())
        fake.tasks = {10: {"project": 1, "data": {"image": uri}}, 11: {"project": 1, "data": {"image": uri}},
                      20: {"project": 2, "data": {"image": uri}}}
        fake.annotations = {100: {"task": 10, "result": [polygon("rust", LEFT), polygon("lesion", RIGHT)]},
                            200: {"task": 20, "result": [polygon("lesion", WHOLE)]}}
        yield fake


@pytest.fixture
def settings(tiny_settings, fake, tmp_path):
    return tiny_settings.model_copy(update={"model_dir": tmp_path, "label_studio_url": fake.url,
                                            "label_studio_api_key": TOKEN})


class Backend:
    """A started app and the calls the tests make of it."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.state = client.app.state
        wait_until_ready(client)

    def webhook(self, action: str, project: int, **payload) -> None:
        answer = self.client.post("/webhook", json={"action": action, "project": {"id": project}, **payload})
        assert answer.status_code == 200
        self.state.learner.join()

    def memory(self, project: int):
        return self.state.memories.load(str(project), self.state.worker.fingerprint)

    def predict(self, project: int, image: np.ndarray) -> dict:
        answer = predict(self.client, image_tasks(data_uri(image)), CONFIG, project=f"{project}.1700000000")
        assert answer.status_code == 200, answer.text
        return answer.json()

    def setup_version(self, project: int) -> str:
        answer = self.client.post("/setup", json={"project": f"{project}.1700000000", "schema": CONFIG})
        return answer.json()["model_version"]

    def learning_events(self) -> str:
        return "\n".join(line for line in self.client.get("/metrics").text.splitlines()
                         if line.startswith("freeseg_learning_events_total"))


@pytest.fixture
def backend(settings, tiny_segmenter):
    with TestClient(create_app(settings, load_segmenter=lambda: tiny_segmenter)) as client:
        yield Backend(client)


def _annotation(annotation_id: int, task: int, result: list[dict]) -> dict:
    return {"annotation": {"id": annotation_id, "task": task, "result": result}}


def _masks(prediction: dict) -> dict[str, np.ndarray]:
    masks = {}
    for region in prediction["result"]:
        height, width = region["original_height"], region["original_width"]
        mask = np.reshape(decode_rle(region["value"]["rle"]), (height, width, 4))[:, :, 3] > 0
        masks[region["value"]["brushlabels"][0]] = mask
    return masks


def test_a_forged_webhook_teaches_nothing(backend, fake):
    # An annotation Label Studio does not hold.
    backend.webhook("ANNOTATION_CREATED", 1, **_annotation(999, 10, [polygon("rust", WHOLE)]))
    # An annotation of project 2's task, sent as project 1's.
    backend.webhook("ANNOTATION_CREATED", 1, **_annotation(200, 20, [polygon("lesion", WHOLE)]))
    assert backend.memory(1) is None and backend.memory(2) is None
    assert 'action="learn",outcome="foreign_annotation"} 1.0' in backend.learning_events()
    # An annotation Label Studio holds differently: what it holds is learned, not the payload.
    backend.webhook("ANNOTATION_CREATED", 1, **_annotation(100, 10, [polygon("lesion", WHOLE)]))
    memory = backend.memory(1)
    assert list(memory.annotations) == ["100"]
    assert {label for label in memory.labels if label != UNLABELED} == {"rust", "lesion"}
    assert memory.regions_taught("rust") == memory.regions_taught("lesion") == 1
    assert "/api/annotations/100/" in fake.requests
    # The task is read from the task list, never GET /api/tasks/10/ (that makes Label Studio call /predict).
    assert "/api/tasks/10/" not in fake.requests and any("query=" in path for path in fake.requests)


def test_update_replaces_and_delete_forgets_only_what_label_studio_deleted(backend, fake):
    backend.webhook("ANNOTATION_CREATED", 1, **_annotation(100, 10, []))
    first = backend.memory(1)
    fake.annotations[100].update(result=[polygon("rust", WHOLE)], updated_at="2026-12-03T09:05:00.000000Z")
    backend.webhook("ANNOTATION_UPDATED", 1, **_annotation(100, 10, []))
    updated = backend.memory(1)
    assert list(updated.annotations) == ["100"] and updated.labels == ["rust"]
    assert updated.revision > first.revision
    # A read of the older version that arrives late (its updated_at is earlier) changes nothing.
    fake.annotations[100].update(result=[polygon("lesion", WHOLE)], updated_at=UPDATED_AT)
    backend.webhook("ANNOTATION_UPDATED", 1, **_annotation(100, 10, []))
    assert backend.memory(1).labels == ["rust"] and backend.memory(1).revision == updated.revision
    # Said deleted while Label Studio still holds it: kept.
    backend.webhook("ANNOTATIONS_DELETED", 1, annotations=[{"id": 100}])
    assert list(backend.memory(1).annotations) == ["100"]
    del fake.annotations[100]
    backend.webhook("ANNOTATIONS_DELETED", 1, annotations=[{"id": 100}])
    assert backend.memory(1).annotations == {}
    events = backend.learning_events()
    assert 'action="forget",outcome="kept"} 1.0' in events and 'action="forget",outcome="done"} 1.0' in events


def test_two_projects_never_see_each_others_memory(backend, fake):
    image = _image()
    before = backend.predict(2, image)
    base_version = before["model_version"]
    assert "-m" not in base_version.removeprefix("freesegdiff-").split("-")[-1]
    fake.tasks[12] = fake.tasks[10]
    for annotation, task in ((101, 11), (102, 12)):
        fake.annotations[annotation] = {"task": task, "result": fake.annotations[100]["result"]}
    for annotation, task in ((100, 10), (101, 11), (102, 12)):
        backend.webhook("ANNOTATION_CREATED", 1, **_annotation(annotation, task, []))
    revision = backend.memory(1).revision
    taught = backend.predict(1, image)
    assert taught["model_version"] == f"{base_version}-m{revision}" == backend.setup_version(1)
    # The taught project labels the taught image as it was annotated (cells follow their own exemplars).
    # The tiny profile's random CLIP is 95-99 % sure of one label everywhere: three regions of each label
    # (w = 0.75) outweigh it.
    masks = _masks(taught["results"][0])
    left = np.zeros(image.shape[:2], bool)
    left[:, :64] = True
    for label, half in (("rust", left), ("lesion", ~left)):
        iou = (masks[label] & half).sum() / (masks[label] | half).sum()
        assert iou > 0.8, (label, iou)
    # The other project's predictions did not change, nor its model_version.
    after = backend.predict(2, image)
    assert after == before and backend.setup_version(2) == base_version


def test_start_training_and_train_rebuild_from_all_the_projects_annotations(backend, fake):
    fake.annotations[101] = {"task": 11, "result": [polygon("lesion", LEFT)]}
    fake.annotations[102] = {"task": 11, "result": [polygon("rust", LEFT)], "was_cancelled": True}
    backend.webhook("START_TRAINING", 1)
    assert sorted(backend.memory(1).annotations) == ["100", "101"] and backend.memory(2) is None
    del fake.annotations[101]
    answer = backend.client.post("/train", json={"project": "1.1700000000", "annotations": []})
    assert answer.status_code == 200
    backend.state.learner.join()
    assert sorted(backend.memory(1).annotations) == ["100"]
    assert 'action="rebuild",outcome="done"} 2.0' in backend.learning_events()


def test_the_memory_survives_a_restart_with_the_file_store(settings, tiny_segmenter):
    with TestClient(create_app(settings, load_segmenter=lambda: tiny_segmenter)) as client:
        first = Backend(client)
        first.webhook("ANNOTATION_CREATED", 1, **_annotation(100, 10, []))
        version, memory = first.setup_version(1), first.memory(1)
    with TestClient(create_app(settings, load_segmenter=lambda: tiny_segmenter)) as client:
        second = Backend(client)
        kept = second.memory(1)
        assert second.setup_version(1) == version and kept.revision == memory.revision
        assert list(kept.annotations) == ["100"] and kept.labels == memory.labels
        assert all(np.array_equal(kept.vectors(label), memory.vectors(label)) for label in memory.labels)


def test_the_memory_is_shared_through_redis(settings, tiny_segmenter, redis_server, tmp_path):
    shared = settings.model_copy(update={"redis_url": redis_server.url})
    one = TestClient(create_app(shared.model_copy(update={"model_dir": tmp_path / "one"}), lambda: tiny_segmenter))
    two = TestClient(create_app(shared.model_copy(update={"model_dir": tmp_path / "two"}), lambda: tiny_segmenter))
    with one, two:
        first, second = Backend(one), Backend(two)
        base = second.predict(1, _image())["model_version"]
        first.webhook("ANNOTATION_CREATED", 1, **_annotation(100, 10, []))
        revision = first.memory(1).revision
        assert second.predict(1, _image())["model_version"] == f"{base}-m{revision}"


@pytest.mark.slow
def test_freesegdiff_learn_rebuilds_and_forgets(settings, fake, monkeypatch, capsys):
    monkeypatch.setenv("FREESEG_MODELS", "tiny")
    monkeypatch.setenv("FREESEG_DEVICE", "cpu")
    monkeypatch.setenv("MODEL_DIR", str(settings.model_dir))
    monkeypatch.setenv("FREESEG_ALLOW_PRIVATE_URLS", "true")
    from backend.settings import get_settings

    get_settings.cache_clear()
    try:
        assert main(["learn", "--project", "1", "--url", fake.url, "--api-key", TOKEN]) == 0
        assert "memory of 1 annotations, labels rust, lesion" in capsys.readouterr().out
        assert main(["learn", "--project", "1", "--forget"]) == 0
        assert "memory cleared" in capsys.readouterr().out
    finally:
        get_settings.cache_clear()


def test_freesegdiff_learn_takes_encodings_from_the_feature_cache(settings, fake, monkeypatch, capsys, redis_server):
    from backend.pipeline.segmenter import Segmenter
    from backend.settings import get_settings

    for name, value in (("FREESEG_MODELS", "tiny"), ("FREESEG_DEVICE", "cpu"), ("MODEL_DIR", str(settings.model_dir)),
                        ("FREESEG_ALLOW_PRIVATE_URLS", "true"), ("REDIS_URL", redis_server.url)):
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        assert main(["learn", "--project", "1", "--url", fake.url, "--api-key", TOKEN]) == 0
        with redis_server.client() as client:
            assert client.keys("freeseg:enc:*")  # the first rebuild encoded, and wrote what it encoded
        monkeypatch.setattr(Segmenter, "encode", lambda *args, **kwargs: pytest.fail("encoded again"))
        assert main(["learn", "--project", "1", "--url", fake.url, "--api-key", TOKEN]) == 0
        assert capsys.readouterr().out.count("memory of 1 annotations") == 2
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize("kind", ["file", "redis"])
def test_the_store_lock_keeps_read_modify_writes_whole(kind, tmp_path, redis_server):
    store = FileStore(tmp_path) if kind == "file" else RedisStore(redis_server.url)
    store.put("counter:lock-test", b"0")

    def add_one() -> None:
        for _ in range(20):
            with store.lock("counter:lock-test"):
                value = int(store.get("counter:lock-test"))
                time.sleep(0.001)  # invites the other threads in, were the lock not held
                store.put("counter:lock-test", str(value + 1).encode())

    threads = [threading.Thread(target=add_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.get("counter:lock-test") == b"80"


def test_with_basic_auth_webhooks_and_train_demand_it(settings, tiny_segmenter):
    guarded = settings.model_copy(update={"basic_auth_user": "ls", "basic_auth_pass": "secret"})
    with TestClient(create_app(guarded, load_segmenter=lambda: tiny_segmenter)) as client:
        backend = Backend(client)
        payload = {"action": "ANNOTATION_CREATED", "project": {"id": 1}, **_annotation(100, 10, [])}
        assert client.post("/webhook", json=payload).status_code == 401
        assert client.post("/train", json={"project": "1.1700000000"}).status_code == 401
        backend.state.learner.join()
        assert backend.memory(1) is None
        assert client.post("/webhook", json=payload, auth=("ls", "secret")).status_code == 200
        backend.state.learner.join()
        assert list(backend.memory(1).annotations) == ["100"]


def test_an_annotation_that_kept_our_prediction_unchanged_teaches_nothing(backend, fake):
    fake.annotations[101] = {"task": 11, "result": [polygon("rust", LEFT), polygon("lesion", RIGHT)]}
    backend.webhook("ANNOTATION_CREATED", 1, **_annotation(101, 11, []))
    taught = backend.memory(1)
    prediction = backend.predict(1, _image())  # the memory's prediction: it has regions
    result = prediction["results"][0]["result"]
    assert result
    fake.predictions[500] = {"task": 10, "result": result, "model_version": prediction["model_version"]}
    fake.annotations[100] = {"task": 10, "result": result, "parent_prediction": 500}  # submitted as predicted
    backend.webhook("ANNOTATION_CREATED", 1, **_annotation(100, 10, []))
    assert list(backend.memory(1).annotations) == ["101"] and backend.memory(1).revision == taught.revision
    assert 'action="learn",outcome="none"} 1.0' in backend.learning_events()
    fake.annotations[100]["result"] = [polygon("lesion", WHOLE)]  # corrected
    backend.webhook("ANNOTATION_UPDATED", 1, **_annotation(100, 10, []))
    assert list(backend.memory(1).annotations) == ["101", "100"]


def test_an_update_that_changes_nothing_leaves_the_model_version(backend, fake):
    backend.webhook("ANNOTATION_CREATED", 1, **_annotation(100, 10, []))
    version = backend.setup_version(1)
    backend.webhook("ANNOTATION_UPDATED", 1, **_annotation(100, 10, []))  # a comment changed, say
    backend.webhook("START_TRAINING", 1)
    assert backend.setup_version(1) == version


def test_project_deleted_drops_its_memory_and_setup_once_label_studio_deleted_it(backend, fake):
    backend.webhook("ANNOTATION_CREATED", 1, **_annotation(100, 10, []))
    backend.webhook("ANNOTATION_CREATED", 2, **_annotation(200, 20, []))
    backend.client.post("/setup", json={"project": "1.1700000000", "schema": CONFIG, "extra_params": {"k": 3}})
    setups = backend.client.app.state.memories.store.store
    backend.webhook("PROJECT_DELETED", 1)  # forged: Label Studio still holds project 1
    assert backend.memory(1) is not None and setups.get("projects:1") is not None
    del fake.projects[1]
    backend.webhook("PROJECT_DELETED", 1)
    assert backend.memory(1) is None and setups.get("projects:1") is None
    assert backend.memory(2) is not None
    events = backend.learning_events()
    assert 'action="drop",outcome="kept"} 1.0' in events and 'action="drop",outcome="done"} 1.0' in events


def test_tasks_deleted_forgets_what_their_annotations_taught(backend, fake):
    fake.annotations[101] = {"task": 11, "result": [polygon("lesion", LEFT)]}
    backend.webhook("START_TRAINING", 1)
    assert sorted(backend.memory(1).annotations) == ["100", "101"]
    backend.webhook("TASKS_DELETED", 1, tasks=[{"id": 11}])  # forged: the task is still there
    assert sorted(backend.memory(1).annotations) == ["100", "101"]
    del fake.tasks[11], fake.annotations[101]
    backend.webhook("TASKS_DELETED", 1, tasks=[{"id": 11}])
    assert sorted(backend.memory(1).annotations) == ["100"]


def test_a_label_gone_from_the_config_is_neither_predicted_nor_taught_again(backend, fake):
    backend.webhook("ANNOTATION_CREATED", 1, **_annotation(100, 10, []))
    renamed = CONFIG.replace('value="rust"', 'value="corrosion"')
    answer = predict(backend.client, image_tasks(data_uri(_image())), renamed, project="1.1700000000")
    assert answer.status_code == 200 and "rust" not in _masks(answer.json()["results"][0])
    fake.projects[1] = renamed
    backend.webhook("START_TRAINING", 1)
    assert "rust" not in backend.memory(1).labels and "lesion" in backend.memory(1).labels


def test_a_learn_racing_the_delete_of_its_annotation_never_brings_it_back(settings, tiny_segmenter, fake):
    from backend.labelstudio.backoff import Backoff
    from backend.labelstudio.task_images import TaskImageLoader
    from backend.labelstudio.teacher import ProjectTeacher
    from backend.labelstudio.projects import ProjectStore
    from backend.storage.backing import project_memories
    from backend.labelstudio.access import LabelStudioAccess

    access = LabelStudioAccess(fake.url, TOKEN)

    def teacher(encode) -> ProjectTeacher:  # each a process of its own, on the same MODEL_DIR
        memories = project_memories(settings)
        return ProjectTeacher(memories, ProjectStore(memories.store.store), TaskImageLoader.from_settings(settings),
                              encode, tiny_segmenter.fingerprint, Backoff.from_settings(settings))

    other = teacher(lambda image: tiny_segmenter.encode(image.pixels))

    def encode_while_deleted(image):  # the annotation is deleted, and forgotten elsewhere, mid-learn
        del fake.annotations[100]
        assert other.forget("1", 100, access)
        return tiny_segmenter.encode(image.pixels)

    teacher(encode_while_deleted).learn("1", 100, access)
    assert project_memories(settings).load("1", tiny_segmenter.fingerprint).annotations == {}


def test_the_memory_route_shows_what_was_taught_behind_basic_auth(settings, tiny_segmenter):
    guarded = settings.model_copy(update={"basic_auth_user": "ls", "basic_auth_pass": "secret"})
    with TestClient(create_app(guarded, load_segmenter=lambda: tiny_segmenter)) as client:
        backend = Backend(client)
        assert client.get("/memory/1").status_code == 401
        missing = client.get("/memory/1", auth=("ls", "secret"))
        assert missing.status_code == 404 and missing.json()["kind"] == "no_memory"
        assert client.get("/memory/abc", auth=("ls", "secret")).json()["kind"] == "project"
        client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": 1},
                                      **_annotation(100, 10, [])}, auth=("ls", "secret"))
        backend.state.learner.join()
        shown = client.get("/memory/1.1700000000", auth=("ls", "secret"))
        assert shown.status_code == 200
        body, memory = shown.json(), backend.memory(1)
        labels = {item["label"]: item for item in body["labels"]}
        assert sorted(labels) == ["lesion", "rust"]  # its two regions cover the image: no unlabeled cells
        rust = labels["rust"]
        assert rust["regions"] == 1 and rust["cells"] > 0 and rust["annotations"] == ["100"]
        assert body["bytes"] == memory.nbytes == sum(item["bytes"] for item in body["labels"])
        assert body["revision"] == memory.revision
        assert [(a["annotation"], a["task"]) for a in body["annotations"]] == [("100", "10")]
        setup = client.post("/setup", json={"project": "1.1700000000", "schema": CONFIG}, auth=("ls", "secret"))
        assert body["model_version"] == setup.json()["model_version"]


def test_a_changed_memory_gives_fresh_scores_under_a_new_model_version(backend, fake):
    image = _image()
    before = backend.predict(1, image)
    fake.tasks[12] = fake.tasks[10]
    for annotation, task in ((101, 11), (102, 12)):
        fake.annotations[annotation] = {"task": task, "result": fake.annotations[100]["result"]}
    for annotation, task in ((100, 10), (101, 11), (102, 12)):
        backend.webhook("ANNOTATION_CREATED", 1, **_annotation(annotation, task, []))
    after = backend.predict(1, image)
    # what Label Studio re-asks for: a /setup version its stored predictions lack
    assert after["model_version"] != before["model_version"] == backend.predict(2, image)["model_version"]
    scores = [prediction["results"][0]["score"] for prediction in (before, after)]
    # the memory was taught this very image: its exemplars agree with the prediction, CLIP alone did not vouch
    assert 0 <= scores[0] < scores[1] <= 1, scores
    assert all(0 <= region["score"] <= 1 for region in after["results"][0]["result"])
