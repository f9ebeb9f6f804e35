"""Downloading exactly the files the configured models load (``freesegdiff download``).

Each repo's file list comes from the hub (``model_info``); ``backend.models.selection``
picks the files from it; what the Hugging Face cache already holds for that commit is not
fetched again, so a second run fetches nothing. The hub client honours ``HF_ENDPOINT``,
``HF_TOKEN`` and ``HF_HOME``. Sources that are local folders or files need no download.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache
from huggingface_hub.utils import enable_progress_bars

from backend.models.captioners import CAPTIONERS, captioner_source
from backend.models.selection import OPEN_CLIP, TAESD, Component, select_files, stable_diffusion_components
from backend.settings import CaptionerKind, Settings

Echo = Callable[[str], None]


@dataclass(frozen=True)
class RepoRequest:
    """A hub repo the models load from, the components read from it, and in which precision."""

    repo_id: str
    components: tuple[Component, ...]
    half: bool
    setting: str  # the setting that names the repo, for error messages


@dataclass(frozen=True)
class PlannedFile:
    repo_id: str
    path: str
    size: int | None  # bytes, as the hub lists them
    cached: bool


def clip_repo(model_name: str, tag: str) -> str | None:
    """The hub repo open_clip keeps a pretrained tag's weights in, or None when it has none."""
    config = open_clip.get_pretrained_cfg(model_name, tag)
    return config["hf_hub"].strip("/") if config and config.get("hf_hub") else None


def repo_requests(settings: Settings, half: bool, captioner_half: bool, captioner: CaptionerKind) -> list[RepoRequest]:
    """The hub repos the pretrained profile loads with these settings and ``captioner`` (FREESEG_CAPTIONER,
    resolved), local sources left out: TAESD's and not the VAE's files with FREESEG_ENCODER=taesd."""
    def is_local(source: str | Path | None) -> bool:
        return source is not None and Path(source).expanduser().exists()

    requests = []
    if not is_local(settings.sd_model):
        requests.append(RepoRequest(settings.sd_model, stable_diffusion_components(settings.encoder), half,
                                    "FREESEG_SD_MODEL"))
    if settings.encoder == "taesd" and not is_local(settings.taesd_model):
        requests.append(RepoRequest(settings.taesd_model, TAESD, half, "FREESEG_TAESD_MODEL"))
    if not is_local(settings.clip_model) and not settings.clip_checkpoint:
        repo = clip_repo(settings.clip_model, settings.clip_pretrained)
        if repo:
            requests.append(RepoRequest(repo, OPEN_CLIP, False, "FREESEG_CLIP_PRETRAINED"))
    source = captioner_source(settings, captioner)
    if not is_local(source):
        requests.append(RepoRequest(source, CAPTIONERS[captioner].components, captioner_half, "FREESEG_CAPTIONER_MODEL"))
    return requests


def plan(requests: list[RepoRequest], api: HfApi) -> list[PlannedFile]:
    """The files to have, from each repo's listing on the hub; ``cached`` when already here."""
    planned = []
    for request in requests:
        info = api.model_info(request.repo_id, files_metadata=True)
        sizes = {sibling.rfilename: sibling.size for sibling in info.siblings or []}
        try:
            paths = select_files(sizes, request.components, request.half)
        except ValueError as error:
            raise ValueError(f"{request.repo_id} (set by {request.setting}): {error}") from error
        for path in paths:
            cached = isinstance(try_to_load_from_cache(request.repo_id, path, revision=info.sha), str)
            planned.append(PlannedFile(request.repo_id, path, sizes[path], cached))
    return planned


def fetch(planned: list[PlannedFile], echo: Echo = print) -> int:
    """Download the files not yet cached, printing each with its size; the bytes fetched."""
    enable_progress_bars()  # the CLI turns the libraries' bars off; a download is where they belong
    fetched = 0
    for file in planned:
        state = "cached" if file.cached else "fetch"
        echo(f"{state:6} {file.repo_id}/{file.path} ({format_size(file.size)})")
        if not file.cached:
            hf_hub_download(file.repo_id, file.path)  # with the hub client's progress bar
            fetched += file.size or 0
    total = sum(file.size or 0 for file in planned)
    echo(f"{len(planned)} files, {format_size(total)} in all; fetched now: {format_size(fetched)}")
    return fetched


def format_size(size: int | None) -> str:
    """Bytes in decimal units, as the hub shows them."""
    if size is None:
        return "size unknown"
    if size < 1000:
        return f"{size} B"
    value = float(size)
    for unit in ("kB", "MB", "GB", "TB"):
        value /= 1000
        if value < 1000 or unit == "TB":
            break
    return f"{value:.2f} {unit}"
