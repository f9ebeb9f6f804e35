"""Which files of a model repo the loaders read: per component, its configs and one set of weights.

Model repos on the hub hold every format and variant of their weights (fp32 and fp16,
``.bin`` beside ``.safetensors``, EMA and non-EMA twins, root-level checkpoints, a safety
checker). The rule here is computed from a list of the repo's file paths, so the same rule
picks the files to download from a hub listing and the files to load from a local folder:

- per component, the weight files of one format and variant: safetensors where there are
  any, the fp16 variant when the models run in half precision and the repo has it, else
  the plain (variant-less) files; a sharded set is its index and the shards of its name;
- the component's own config and tokenizer files (``.json``, ``.txt``, ``.model``);
- nothing else: other components, other variants, other formats, documentation.

Weight files are recognised by the loading libraries' own file names (``model``,
``pytorch_model``, ``diffusion_pytorch_model``, open_clip's), never by a repo's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from diffusers.utils.constants import SAFETENSORS_WEIGHTS_NAME as DIFFUSERS_SAFETENSORS
from diffusers.utils.constants import WEIGHTS_NAME as DIFFUSERS_BIN
from transformers.utils import SAFE_WEIGHTS_NAME, WEIGHTS_NAME

HALF_VARIANT = "fp16"
FORMATS = ("safetensors", "bin")  # in order of preference: safetensors runs no code when read
CONFIG_SUFFIXES = (".json", ".txt", ".model")  # configs, tokenizer vocabularies and merges, sentencepiece

_SINGLE = re.compile(r"(?P<stem>[^.]+?)(?P<shard>-\d{5}-of-\d{5})?(?:\.(?P<variant>[^.]+?))?"
                     r"(?P<shard2>-\d{5}-of-\d{5})?\.(?P<format>safetensors|bin)")
_INDEX = re.compile(r"(?P<stem>[^.]+)\.(?P<format>safetensors|bin)\.index(?:\.(?P<variant>[^.]+))?\.json")


def _stems(*names: str) -> frozenset[str]:
    return frozenset(name.split(".")[0] for name in names)


TRANSFORMERS_STEMS = _stems(SAFE_WEIGHTS_NAME, WEIGHTS_NAME)
DIFFUSERS_STEMS = _stems(DIFFUSERS_SAFETENSORS, DIFFUSERS_BIN)
OPEN_CLIP_STEMS = _stems("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's hub names


@dataclass(frozen=True)
class Component:
    """A folder of a repo that one loader reads: its weights (by the library's names) and configs."""

    folder: str  # "" for the repo's root
    weight_stems: frozenset[str] = frozenset()  # empty: a component without weights (a tokenizer)
    with_configs: bool = True


@dataclass(frozen=True)
class Weights:
    """The chosen weights of a component: what ``from_pretrained`` is told to load."""

    format: str  # "safetensors" or "bin"
    variant: str | None  # "fp16", or None for the plain files
    files: tuple[str, ...]  # repo paths, the index first when sharded

    @property
    def use_safetensors(self) -> bool:
        return self.format == "safetensors"


STABLE_DIFFUSION = (
    Component("unet", DIFFUSERS_STEMS),
    Component("vae", DIFFUSERS_STEMS),
    Component("text_encoder", TRANSFORMERS_STEMS),
    Component("tokenizer"),
)
CAPTIONER = (Component("", TRANSFORMERS_STEMS),)
TAESD = (Component("", DIFFUSERS_STEMS),)  # madebyollin/taesd: diffusers' files at the root, beside .pth twins
OPEN_CLIP = (Component("", OPEN_CLIP_STEMS, with_configs=False),)


def stable_diffusion_components(encoder: str) -> tuple[Component, ...]:
    """The Stable Diffusion folders read for FREESEG_ENCODER=``encoder``: the VAE's only when it encodes."""
    return tuple(part for part in STABLE_DIFFUSION if encoder == "vae" or part.folder != "vae")


def _in_folder(paths: Iterable[str], folder: str) -> dict[str, str]:
    """The file names directly inside ``folder`` (not deeper), mapped to their repo paths."""
    names = {}
    for path in paths:
        parent = str(PurePosixPath(path).parent)
        if parent == (folder or "."):
            names[PurePosixPath(path).name] = path
    return names


def _shard_sets(names: Sequence[str], component: Component) -> dict[tuple[str, str | None], list[str]]:
    """Weight files by (format, variant): an index with its shards, or one single file."""
    sets: dict[tuple[str, str | None], list[str]] = {}
    for name in names:
        index = _INDEX.fullmatch(name)
        if index and index["stem"] in component.weight_stems:
            shards = [n for n in names if (m := _SINGLE.fullmatch(n)) and (m["shard"] or m["shard2"])
                      and m["stem"] == index["stem"] and m["variant"] == index["variant"]]
            if shards:
                sets.setdefault((index["format"], index["variant"]), [name, *sorted(shards)])
    for name in names:
        single = _SINGLE.fullmatch(name)
        if single and not (single["shard"] or single["shard2"]) and single["stem"] in component.weight_stems:
            sets.setdefault((single["format"], single["variant"]), [name])
    return sets


def select_weights(paths: Iterable[str], component: Component, half: bool) -> Weights | None:
    """The weights ``component``'s loader should read, or None when the paths hold none."""
    names = _in_folder(paths, component.folder)
    sets = _shard_sets(sorted(names), component)
    variants = (HALF_VARIANT, None) if half else (None,)
    for format_ in FORMATS:
        for variant in variants:
            if (format_, variant) in sets:
                files = tuple(names[name] for name in sets[(format_, variant)])
                return Weights(format_, variant, files)
    return None


def select_files(paths: Iterable[str], components: Sequence[Component], half: bool) -> list[str]:
    """Every repo path the components' loaders read, sorted; raises ValueError if weights are missing."""
    paths = list(paths)
    chosen: set[str] = set()
    for component in components:
        names = _in_folder(paths, component.folder)
        if component.with_configs:
            chosen.update(path for name, path in names.items()
                          if name.endswith(CONFIG_SUFFIXES) and not _INDEX.fullmatch(name))
        if component.weight_stems:
            weights = select_weights(paths, component, half)
            if weights is None:
                where = component.folder or "the repo's root"
                raise ValueError(f"no {' or '.join(FORMATS)} weights in {where}")
            chosen.update(weights.files)
    return sorted(chosen)
