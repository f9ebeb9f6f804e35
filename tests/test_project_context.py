"""One project context: the options' precedence (defaults, the config's attributes, extra_params), Label Studio
access (LABEL_STUDIO_URL, else what /setup kept) and the connection a job reads (the store, else Label Studio's
``/api/ml``, here a loopback stand-in), with the real label-config parser and a real file store."""

from __future__ import annotations

import pytest

from backend.labelstudio.access import LabelStudioAccess
from backend.labelstudio.config import parse_label_config
from backend.labelstudio.project_context import label_studio_access, open_project, project_context, project_model_version
from backend.models.identity import model_version
from backend.labelstudio.projects import ProjectSetup, ProjectStore
from backend.options import OptionError
from backend.settings import Settings
from backend.storage.shared_store import FileStore
from tests.fake_labelstudio import TOKEN, FakeLabelStudio

OURS = "freesegdiff-0.1.0-abc-tiny-random-weights"


def config(attributes: str = "") -> str:
    return (f'<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image" {attributes}>'
            '<Label value="cat"/><Label value="dog"/></BrushLabels></View>')


def options_of(attributes: str, extra_params: dict, settings: Settings):
    vocabulary = parse_label_config(config(attributes))
    return project_context(settings, vocabulary, ProjectSetup(options=extra_params), None).options


def test_extra_params_win_over_the_config_which_wins_over_the_defaults(tmp_path):
    settings = Settings(model_dir=tmp_path, k=6, refine="crf")
    assert options_of("", {}, settings).k == 6
    assert options_of('model_k="5"', {}, settings).k == 5
    both = options_of('model_k="5" model_refine="none"', {"k": 3}, settings)
    assert (both.k, both.refine) == (3, "none")  # option by option: extra_params' k, the config's refine
    only_extra = options_of("", {"use_caption": False}, settings)
    assert (only_extra.k, only_extra.use_caption, only_extra.refine) == (6, False, "crf")


def test_the_context_carries_the_memorys_version(tmp_path):
    settings = Settings(model_dir=tmp_path)
    exemplars = object()  # the memory's, handed on as they are
    context = project_context(settings, parse_label_config(config()), ProjectSetup(), (7, exemplars))
    assert (context.model_version, context.exemplars) == (f"{model_version(settings)}-m7", exemplars)
    without = project_context(settings, parse_label_config(config()), ProjectSetup(), None)
    assert (without.model_version, without.exemplars) == (model_version(settings), None)
    assert project_model_version(settings, (7, exemplars)) == context.model_version


def test_label_studio_url_wins_over_setup_and_needs_no_store_call(tmp_path):
    kept = ProjectSetup(access=LabelStudioAccess("http://127.0.0.1:1", "kept-token"))
    with_url = Settings(model_dir=tmp_path, label_studio_url="http://127.0.0.1:2", label_studio_api_key="key")

    def no_store_call() -> ProjectSetup:
        raise AssertionError("the store was read although LABEL_STUDIO_URL is set")

    assert label_studio_access(with_url, no_store_call) == LabelStudioAccess("http://127.0.0.1:2", "key")
    assert label_studio_access(Settings(model_dir=tmp_path), lambda: kept) == kept.access


@pytest.fixture
def fake_labelstudio():
    with FakeLabelStudio() as fake:
        fake.projects[4] = config('model_k="5"')
        fake.ml_backends[1] = {"project": 4, "extra_params": {"k": 2}, "model_version": OURS}
        fake.ml_backends[2] = {"project": 4, "extra_params": {"k": 9}, "model_version": "another-backend"}
        fake.ml_backends[3] = {"project": 8, "extra_params": {"k": 7}, "model_version": OURS}
        yield fake


def test_a_job_reads_the_connection_from_label_studio_when_the_store_has_none(tmp_path, fake_labelstudio):
    settings = Settings(model_dir=tmp_path, label_studio_url=fake_labelstudio.url, label_studio_api_key=TOKEN)
    api, connection = open_project(settings, 4, ProjectStore(FileStore(tmp_path)))
    assert connection.options == {"k": 2}  # ours, not another backend's, not another project's
    assert any(path.startswith("/api/ml") and "project=4" in path for path in fake_labelstudio.requests)
    context = project_context(settings, parse_label_config(api.label_config()), connection, None)
    assert context.options.k == 2


def test_what_setup_kept_wins_over_label_studios_record(tmp_path, fake_labelstudio):
    store = ProjectStore(FileStore(tmp_path))
    store.save(4, ProjectSetup(config(), {"k": 3}, LabelStudioAccess(fake_labelstudio.url, TOKEN)))
    api, connection = open_project(Settings(model_dir=tmp_path), 4, store)  # no LABEL_STUDIO_URL: /setup's
    assert connection.options == {"k": 3} and api.access == LabelStudioAccess(fake_labelstudio.url, TOKEN)
    assert not any(path.startswith("/api/ml") for path in fake_labelstudio.requests)


def test_a_bad_extra_param_in_label_studio_names_its_connection(tmp_path, fake_labelstudio):
    fake_labelstudio.ml_backends[1]["extra_params"] = {"k": 100}
    settings = Settings(model_dir=tmp_path, label_studio_url=fake_labelstudio.url, label_studio_api_key=TOKEN)
    with pytest.raises(OptionError, match="extra_params.k of ML backend 1"):
        open_project(settings, 4, ProjectStore(FileStore(tmp_path)))


def test_without_access_anywhere_the_error_names_the_setting(tmp_path):
    with pytest.raises(ValueError, match="LABEL_STUDIO_URL"):
        open_project(Settings(model_dir=tmp_path), 4, ProjectStore(FileStore(tmp_path)))
