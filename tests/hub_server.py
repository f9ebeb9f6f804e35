"""A stand-in Hugging Face hub on loopback, for download tests (``HF_ENDPOINT``).

It answers the calls huggingface_hub makes: ``GET /api/models/<repo>`` (the file list,
with sizes when ``blobs=true``), and ``HEAD``/``GET /<repo>/resolve/<revision>/<path>``
(metadata headers, then the bytes). It serves repos shaped like the real ones, whose
loadable weights are the tiny profile's models and whose other files (fp16 and ``.bin``
twins, EMA variants, safety checker, root checkpoints) are a few dummy bytes, and it
records every request, so tests can assert exactly what was fetched. No Xet headers are
sent, so the client downloads over plain HTTP (tests also set HF_HUB_DISABLE_XET, and
HF_HUB_DISABLE_TELEMETRY, without which the client asks for /api/agent-harnesses).
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import unquote, urlsplit

from safetensors.torch import load_file, save_file

from tests.http_server import RecordingServer, send

SD_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
BLIP2_REPO = "Salesforce/blip2-opt-2.7b"
BLIP_REPO = "Salesforce/blip-image-captioning-base"
TAESD_REPO = "madebyollin/taesd"

# Files nothing loads, beside the real ones (names as in the real repos).
SD_EXTRAS = (
    "model_index.json", "v1-5-pruned.ckpt", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.ckpt",
    "v1-5-pruned-emaonly.safetensors", "README.md", ".gitattributes",
    "feature_extractor/preprocessor_config.json", "safety_checker/config.json",
    "safety_checker/model.safetensors", "safety_checker/model.fp16.safetensors", "safety_checker/pytorch_model.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/model.fp16.safetensors", "text_encoder/pytorch_model.bin", "text_encoder/pytorch_model.fp16.bin",
    "text_encoder/flax_model.msgpack",
    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.bin", "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.non_ema.bin", "unet/diffusion_flax_model.msgpack",
    "vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.fp16.bin",
)
BLIP2_EXTRAS = (
    "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json",
    "README.md", ".gitattributes",
)
BLIP_EXTRAS = ("pytorch_model.bin", "tf_model.h5", "README.md", ".gitattributes")
TAESD_EXTRAS = ("diffusion_pytorch_model.bin", "taesd_encoder.pth", "taesd_decoder.pth", "taesd_encoder.safetensors",
                "taesd_decoder.safetensors", "README.md", ".gitattributes")
DUMMY = b"not a model: nothing may load this file\n"


def _files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _sharded(folder: Path, work: Path) -> dict[str, bytes]:
    """A transformers folder with its model.safetensors split in two shards and an index, as BLIP-2's."""
    files = _files_of(folder)
    del files["model.safetensors"]
    tensors = load_file(folder / "model.safetensors")
    keys = sorted(tensors)
    weight_map = {}
    for number, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :]), start=1):
        name = f"model-{number:05d}-of-00002.safetensors"
        save_file({key: tensors[key] for key in part}, str(work / name), metadata={"format": "pt"})
        files[name] = (work / name).read_bytes()
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    return files


def tiny_hub_repos(tiny_folder: Path, work: Path) -> dict[str, dict[str, bytes]]:
    """The four repos, from the tiny profile's folder (``tiny_model_folder``)."""
    work.mkdir(parents=True, exist_ok=True)
    return {
        SD_REPO: {**_files_of(tiny_folder / "stable-diffusion"), **dict.fromkeys(SD_EXTRAS, DUMMY)},
        BLIP2_REPO: {**_sharded(tiny_folder / "blip2", work), **dict.fromkeys(BLIP2_EXTRAS, DUMMY)},
        BLIP_REPO: {**_files_of(tiny_folder / "blip"), **dict.fromkeys(BLIP_EXTRAS, DUMMY)},
        TAESD_REPO: {**_files_of(tiny_folder / "taesd"), **dict.fromkeys(TAESD_EXTRAS, DUMMY)},
    }


class StandInHub:
    """``with StandInHub(repos) as hub``: serves on ``hub.url``; ``hub.requests`` lists (method, path)."""

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos
        self.commits = {repo: hashlib.sha1(repo.encode()).hexdigest() for repo in repos}
        self.downloads_allowed = threading.Event()  # GETs of files wait for it; set by default
        self.downloads_allowed.set()
        self._server = RecordingServer(fallback=self._answer)
        self.url = self._server.url

    def __enter__(self) -> StandInHub:
        self._server.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.downloads_allowed.set()
        self._server.__exit__(*exc)

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, unquoted path without query) of every request so far."""
        return [(request.method, unquote(urlsplit(request.path).path)) for request in self._server.requests]

    def files_fetched(self, since: int = 0) -> set[tuple[str, str | None]]:
        """(repo, path) of every file whose bytes were asked for (GET on resolve) from request ``since`` on."""
        return {self._locate(path) for method, path in self.requests[since:] if method == "GET" and "/resolve/" in path}

    def _locate(self, path: str) -> tuple[str, str | None] | None:
        """(repo, file path) of a resolve URL, (repo, None) of a model_info URL, else None."""
        for repo in self.repos:
            if path == f"/api/models/{repo}" or path.startswith(f"/api/models/{repo}/revision/"):
                return repo, None
            prefix = f"/{repo}/resolve/"
            if path.startswith(prefix):
                return repo, path[len(prefix) :].split("/", 1)[1]
        return None

    def _info(self, repo: str, with_sizes: bool) -> bytes:
        siblings = []
        for name, data in sorted(self.repos[repo].items()):
            sibling: dict = {"rfilename": name}
            if with_sizes:
                sibling.update(size=len(data), blobId=hashlib.sha1(data).hexdigest())
            siblings.append(sibling)
        return json.dumps({"id": repo, "modelId": repo, "sha": self.commits[repo], "private": False,
                           "siblings": siblings}).encode()

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        """A HEAD gets the headers of what a GET gets."""
        url = urlsplit(handler.path)
        located = self._locate(unquote(url.path))
        if located is None or (located[1] is not None and located[1] not in self.repos[located[0]]):
            send(handler, 404, b'{"error": "not found"}', {"Content-Type": "application/json",
                                                            "X-Error-Code": "EntryNotFound"})
            return
        repo, name = located
        if name is None:
            send(handler, 200, self._info(repo, "blobs=true" in url.query), {"Content-Type": "application/json"})
            return
        if handler.command == "GET":
            self.downloads_allowed.wait(60)
        data = self.repos[repo][name]
        send(handler, 200, data, {"Content-Type": "application/octet-stream",
                                  "ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": self.commits[repo],
                                  "Accept-Ranges": "bytes"})
