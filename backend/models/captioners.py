"""The captioners, one entry per FREESEG_CAPTIONER kind: a new captioner is one entry here.

An entry says where the pretrained weights are (its hub id), which transformers class loads
them (the processor is transformers' ``AutoProcessor``), how the ``tiny`` and ``random-full``
profiles build it, how it is asked for a caption, and which files ``freesegdiff download``
fetches for it. The loaders, both offline profiles, the download plan and the process's
``Captioner`` read the entry; none of them names a kind. ``backend.settings`` lists the
kinds' names as FREESEG_CAPTIONER's choices (settings imports nothing from ``models``), and
tests/test_captioners.py keeps that list and this registry the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)

from backend.models.selection import CAPTIONER, Component
from backend.models.tokenizers import build_caption_tokenizer, caption_token_ids
from backend.pipeline.caption import CaptionGeneration
from backend.settings import CaptionerKind, Settings

TINY_IMAGE_SIZE = 64
AUTO_HEADROOM = 2.0  # auto's rule: a GPU holds BLIP-2 when its memory is this many times BLIP-2's weights


@dataclass(frozen=True)
class CaptionerSpec:
    """Everything about one kind of captioner; the builders' random weights come from the caller's seed."""

    kind: str  # FREESEG_CAPTIONER's value, and the tiny profile's folder
    hub_id: str  # FREESEG_CAPTIONER_MODEL's default
    model_class: type[PreTrainedModel]
    generation: CaptionGeneration
    save_tiny: Callable[[Path], None]  # writes the small model and its processor into a folder
    build_random: Callable[[], tuple[PreTrainedModel, ProcessorMixin]]  # full size, on torch's default device
    parameters: int  # of the pretrained model: what its weights weigh in a dtype (auto's rule)
    components: tuple[Component, ...] = CAPTIONER  # what `freesegdiff download` fetches and the loader reads


def _image_processor(size: int) -> BlipImageProcessor:
    return BlipImageProcessor(size={"height": size, "width": size}, image_mean=OPENAI_DATASET_MEAN,
                              image_std=OPENAI_DATASET_STD)


def _tiny_vision_config() -> dict:
    return {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": TINY_IMAGE_SIZE, "patch_size": 16}


def _with_image_token(tokenizer: PreTrainedTokenizerFast) -> int:
    """BLIP-2's image placeholder token, added to the tokenizer; its id."""
    tokenizer.add_special_tokens({"additional_special_tokens": ["[IMG]"]})
    return tokenizer.convert_tokens_to_ids("[IMG]")


def _save_tiny_blip(folder: Path) -> None:
    """BLIP's captioning class, with the special token ids set inside the small vocabulary."""
    tokenizer = build_caption_tokenizer()
    ids = caption_token_ids(tokenizer, with_sep=True)
    text_config = {"vocab_size": len(tokenizer), "hidden_size": 32, "encoder_hidden_size": 32,
                   "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, **ids}
    config = BlipConfig(text_config=text_config, vision_config=_tiny_vision_config(), projection_dim=32)
    model = BlipForConditionalGeneration(config)
    model.generation_config.update(**ids, decoder_start_token_id=tokenizer.bos_token_id)
    model.save_pretrained(folder)
    BlipProcessor(_image_processor(TINY_IMAGE_SIZE), tokenizer).save_pretrained(folder)


def _random_blip() -> tuple[PreTrainedModel, ProcessorMixin]:
    """BLIP base: 224 M parameters."""
    tokenizer = build_caption_tokenizer(vocab_size=30524)
    ids = caption_token_ids(tokenizer, with_sep=True)
    model = BlipForConditionalGeneration(BlipConfig(text_config={"vocab_size": 30524, **ids}))
    model.generation_config.update(**ids, decoder_start_token_id=tokenizer.bos_token_id)
    return model, BlipProcessor(_image_processor(384), tokenizer)


def _save_tiny_blip2(folder: Path) -> None:
    """BLIP-2 with a tiny OPT language model and Q-Former."""
    tokenizer = build_caption_tokenizer()
    image_token_id = _with_image_token(tokenizer)
    ids = caption_token_ids(tokenizer, with_sep=False)
    qformer = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
               "encoder_hidden_size": 32, "vocab_size": len(tokenizer)}
    opt = {"model_type": "opt", "vocab_size": len(tokenizer), "hidden_size": 32, "word_embed_proj_dim": 32,
           "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 2, **ids}
    config = Blip2Config(vision_config=_tiny_vision_config(), qformer_config=qformer, text_config=opt,
                         num_query_tokens=4, image_token_index=image_token_id)
    model = Blip2ForConditionalGeneration(config)
    model.generation_config.update(**ids)
    model.save_pretrained(folder)
    Blip2Processor(_image_processor(TINY_IMAGE_SIZE), tokenizer, num_query_tokens=4).save_pretrained(folder)


def _random_blip2() -> tuple[PreTrainedModel, ProcessorMixin]:
    """BLIP-2 OPT-2.7b: 3.74 B parameters."""
    tokenizer = build_caption_tokenizer(vocab_size=50272)
    ids = caption_token_ids(tokenizer, with_sep=False)
    opt_2_7b = {"model_type": "opt", "vocab_size": 50272, "hidden_size": 2560, "word_embed_proj_dim": 2560,
                "ffn_dim": 10240, "num_hidden_layers": 32, "num_attention_heads": 32, **ids}
    config = Blip2Config(text_config=opt_2_7b, num_query_tokens=32,
                         image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"))
    model = Blip2ForConditionalGeneration(config)
    model.generation_config.update(**ids)
    return model, BlipProcessor(_image_processor(224), tokenizer)


# In the order the tiny profile builds them: its one seeded stream runs through them, so a new
# entry goes last (the earlier models, and the tiny profile's captions, stay as they were).
CAPTIONERS: dict[str, CaptionerSpec] = {
    spec.kind: spec
    for spec in (
        CaptionerSpec(
            kind="blip", hub_id="Salesforce/blip-image-captioning-base", model_class=BlipForConditionalGeneration,
            generation=CaptionGeneration(prompt="a picture of", min_length=10),
            save_tiny=_save_tiny_blip, build_random=_random_blip, parameters=224_000_000,
        ),
        CaptionerSpec(
            kind="blip2", hub_id="Salesforce/blip2-opt-2.7b", model_class=Blip2ForConditionalGeneration,
            generation=CaptionGeneration(), save_tiny=_save_tiny_blip2, build_random=_random_blip2,
            parameters=3_740_000_000,
        ),
    )
}


def auto_captioner(device: torch.device, dtype: torch.dtype) -> CaptionerKind:
    """FREESEG_CAPTIONER=auto on the captioner's device: BLIP-2 on a CUDA device whose memory holds its weights
    in ``dtype`` AUTO_HEADROOM times over (the rest: the feature models, activations, CUDA's own), else BLIP base.

    On a CPU BLIP-2 costs about 70 s and 20 GB of RAM per image, past Label Studio's 100 s with the rest.
    """
    if device.type != "cuda":
        return "blip"
    weights = CAPTIONERS["blip2"].parameters * dtype.itemsize
    fits = weights * AUTO_HEADROOM <= torch.cuda.get_device_properties(device).total_memory
    return "blip2" if fits else "blip"


def captioner_source(settings: Settings, kind: CaptionerKind) -> str:
    """The captioner's hub id or folder: FREESEG_CAPTIONER_MODEL, else the hub id of ``kind`` (FREESEG_CAPTIONER,
    resolved)."""
    return settings.captioner_model or CAPTIONERS[kind].hub_id
