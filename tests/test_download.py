"""``freesegdiff download`` and FREESEG_ALLOW_DOWNLOADS against a stand-in hub on loopback.

The hub serves repos shaped like the real ones (tests/hub_server.py). The command and the
server run as child processes, so that HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE are read by
the hub client as a user's shell would set them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from huggingface_hub import HfApi

from backend.models.assembly import resolve_captioner
from backend.models.download import plan, repo_requests
from backend.models.tiny import tiny_model_folder
from backend.settings import Settings
from tests.app_client import image_tasks, predict
from tests.hub_server import BLIP2_REPO, BLIP_REPO, SD_REPO, TAESD_REPO, StandInHub, tiny_hub_repos

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="building"/><Label value="tree"/></BrushLabels></View>"""

SD_FILES = {"text_encoder/config.json", "tokenizer/merges.txt", "tokenizer/tokenizer.json",
            "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json", "vae/config.json"}
SD_FP32 = {(SD_REPO, p) for p in SD_FILES | {"text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                                              "vae/diffusion_pytorch_model.safetensors"}}
SD_FP16 = {(SD_REPO, p) for p in SD_FILES | {"text_encoder/model.fp16.safetensors",
                                              "unet/diffusion_pytorch_model.fp16.safetensors",
                                              "vae/diffusion_pytorch_model.fp16.safetensors"}}
CAPTIONER_FILES = {"config.json", "generation_config.json", "processor_config.json", "tokenizer.json",
                   "tokenizer_config.json"}
BLIP2 = {(BLIP2_REPO, p) for p in CAPTIONER_FILES | {"model.safetensors.index.json", "model-00001-of-00002.safetensors",
                                                      "model-00002-of-00002.safetensors"}}
BLIP = {(BLIP_REPO, p) for p in CAPTIONER_FILES | {"model.safetensors"}}
SD_WITHOUT_VAE = {(repo, p) for repo, p in SD_FP32 if not p.startswith("vae/")}  # FREESEG_ENCODER=taesd
TAESD = {(TAESD_REPO, "config.json"), (TAESD_REPO, "diffusion_pytorch_model.safetensors")}


@pytest.fixture(scope="module")
def tiny_folder(tiny_settings: Settings) -> Path:
    return tiny_model_folder(tiny_settings.model_dir)


@pytest.fixture(scope="module")
def hub(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory):
    with StandInHub(tiny_hub_repos(tiny_folder, tmp_path_factory.mktemp("hub"))) as hub:
        yield hub


def _settings(tiny_folder: Path, **changes) -> Settings:
    return Settings(models="pretrained", device="cpu", clip_model=str(tiny_folder / "clip"), **changes)


def _planned(hub: StandInHub, settings: Settings, half: bool) -> set[tuple[str, str]]:
    requests = repo_requests(settings, half=half, captioner_half=half, captioner=resolve_captioner(settings))
    return {(f.repo_id, f.path) for f in plan(requests, HfApi(endpoint=hub.url, token=False))}


def test_the_selection_takes_one_weight_set_per_component_from_the_listing(hub, tiny_folder, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets it; only the stand-in is asked
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    assert _planned(hub, _settings(tiny_folder, captioner="blip2"), half=False) == SD_FP32 | BLIP2
    # BLIP-2's repo has no fp16 files
    assert _planned(hub, _settings(tiny_folder, captioner="blip2"), half=True) == SD_FP16 | BLIP2
    assert _planned(hub, _settings(tiny_folder, captioner="blip"), half=False) == SD_FP32 | BLIP
    assert _planned(hub, _settings(tiny_folder), half=False) == SD_FP32 | BLIP  # auto on a CPU: BLIP base
    assert _planned(hub, _settings(tiny_folder, encoder="taesd"), half=False) == SD_WITHOUT_VAE | TAESD | BLIP
    assert _planned(hub, _settings(tiny_folder, encoder="taesd"), half=True) == (  # TAESD's repo has no fp16 files
        {(r, p) for r, p in SD_FP16 if not p.startswith("vae/")} | TAESD | BLIP)


def _env(hub: StandInHub, hf_home: Path, tiny_folder: Path, **extra: str) -> dict[str, str]:
    """The test process's environment without any HF_ or FREESEG_ setting (nor a token), plus these (float32 on
    every CPU: with bfloat16, auto would fetch the fp16 files)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "FREESEG_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(hf_home), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1", FREESEG_DEVICE="cpu", FREESEG_DTYPE="float32", FREESEG_CLIP_MODEL=str(tiny_folder / "clip"),
               PYTHONPATH=str(ROOT), **extra)
    return env


def _download(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backend.cli", "download"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_download_fetches_exactly_what_the_models_load_and_a_second_run_nothing(hub, tiny_folder, tmp_path):
    env = _env(hub, tmp_path / "hf", tiny_folder)
    before = len(hub.requests)
    first = _download(env)
    assert first.returncode == 0, first.stderr
    assert hub.files_fetched(since=before) == SD_FP32 | BLIP  # on a CPU, FREESEG_CAPTIONER=auto is BLIP base
    for repo, path in SD_FP32 | BLIP:
        assert f"{repo}/{path} (" in first.stdout
    assert "16 files" in first.stdout
    middle = len(hub.requests)
    second = _download(env)
    assert second.returncode == 0, second.stderr
    again = hub.requests[middle:]
    assert again and all(path.startswith("/api/models/") for _, path in again)  # only the file lists
    assert "fetched now: 0 B" in second.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Server:
    """``freesegdiff serve`` in a child process."""

    def __init__(self, env: dict[str, str]):
        self.url = f"http://127.0.0.1:{_free_port()}"
        port = self.url.rsplit(":", 1)[1]
        self.process = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve", "--host", "127.0.0.1",
                                         "--port", port], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)

    def states(self, until: str, seconds: float = 240) -> list[str]:
        """The model states /health reported, polled until ``until`` (or a failure)."""
        seen: list[str] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stderr.read()
            try:
                state = httpx.get(f"{self.url}/health", timeout=5).json()["model_state"]
            except httpx.TransportError:
                time.sleep(0.2)
                continue
            if not seen or seen[-1] != state:
                seen.append(state)
            if state in (until, "failed"):
                return seen
            time.sleep(0.05)
        raise AssertionError(f"no {until!r} within {seconds} s; states {seen}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


@pytest.mark.slow
def test_the_server_downloads_then_predicts_and_restarts_offline_without_a_request(
    hub, tiny_folder, tmp_path, image_server
):
    env = _env(hub, tmp_path / "hf", tiny_folder, FREESEG_ALLOW_DOWNLOADS="true", FREESEG_ALLOW_PRIVATE_URLS="true",
               FREESEG_REFINE="none", FREESEG_CRF_PROCESSES="0", MODEL_DIR=str(tmp_path / "models"))
    before = len(hub.requests)
    hub.downloads_allowed.clear()  # files wait until /health has said "downloading"
    server = _Server(env)
    try:
        assert server.states(until="downloading")[-1] == "downloading"
        hub.downloads_allowed.set()
        assert server.states(until="ready")[-1] == "ready"
        assert hub.files_fetched(since=before) == SD_FP32 | BLIP
        response = predict(server.url, image_tasks(f"{image_server}/china.jpg"), CONFIG, timeout=120)
        assert response.status_code == 200 and response.json()["results"][0]["result"]
    finally:
        hub.downloads_allowed.set()
        server.stop()

    requests_so_far = len(hub.requests)
    offline = _Server({**env, "HF_HUB_OFFLINE": "1"})
    try:
        assert offline.states(until="ready")[-1] == "ready"
        assert predict(offline.url, image_tasks(f"{image_server}/china.jpg"), CONFIG, timeout=120).status_code == 200
    finally:
        offline.stop()
    assert hub.requests[requests_so_far:] == []  # not one request to the hub


@pytest.mark.slow
def test_taesd_is_downloaded_in_the_vaes_place_and_loaded_from_the_cache(hub, tiny_folder, tmp_path, china):
    env = _env(hub, tmp_path / "hf", tiny_folder, FREESEG_ENCODER="taesd")
    before = len(hub.requests)
    download = _download(env)
    assert download.returncode == 0, download.stderr
    assert hub.files_fetched(since=before) == SD_WITHOUT_VAE | TAESD | BLIP
    image = tmp_path / "china.png"
    Image.fromarray(china).save(image)
    after = len(hub.requests)
    segment = subprocess.run(  # the pretrained profile's loading code, offline, from what was fetched
        [sys.executable, "-m", "backend.cli", "segment", str(image), "--labels", "building,tree", "--out",
         str(tmp_path / "out"), "--refine", "none"], env={**env, "HF_HUB_OFFLINE": "1"}, cwd=ROOT,
        capture_output=True, text=True, timeout=300)
    assert segment.returncode == 0, segment.stderr
    assert hub.requests[after:] == []
    assert any((tmp_path / "out").iterdir())
