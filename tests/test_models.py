"""Model loading: real loading code, failing fast and clearly when weights are absent."""

import shutil
import time

import pytest
import torch
from diffusers import AutoencoderTiny
from safetensors.torch import load_file

from backend.models.assembly import load_model_parts
from backend.models.loading import (
    ModelUnavailableError,
    load_captioner,
    load_clip,
    load_spacy,
    load_stable_diffusion,
    load_taesd,
)
from backend.models.random_full import build_captioner, build_clip, build_stable_diffusion
from backend.models.tiny import build_tiny_models, tiny_model_folder
from backend.models.identity import model_version
from backend.settings import Settings

CPU = {"device": torch.device("cpu"), "dtype": torch.float32}


@pytest.mark.parametrize(
    "load, setting",
    [
        (lambda: load_stable_diffusion("nobody/no-such-model", **CPU), "FREESEG_SD_MODEL"),
        (lambda: load_captioner("blip", "nobody/no-such-captioner", **CPU), "FREESEG_CAPTIONER_MODEL"),
        (lambda: load_clip("ViT-B-32", "openai", **CPU), "FREESEG_CLIP_PRETRAINED"),
        (lambda: load_clip("ViT-B-32", "no-such-tag", **CPU), "FREESEG_CLIP_PRETRAINED"),
        (lambda: load_spacy("xx_no_such_model"), "FREESEG_SPACY_MODEL"),
        (lambda: load_taesd("nobody/no-such-taesd", torch.float32), "FREESEG_TAESD_MODEL"),
    ],
    ids=["stable-diffusion", "captioner", "clip-weights", "clip-tag", "spacy", "taesd"],
)
def test_missing_weights_fail_at_once_naming_the_setting(load, setting):
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match=setting):
        load()
    assert time.perf_counter() - start < 10


def test_pretrained_profile_without_weights_names_what_to_fetch(tmp_path):
    settings = Settings(models="pretrained", device="cpu", model_dir=tmp_path, sd_model=str(tmp_path / "absent"))
    with pytest.raises(ModelUnavailableError, match="hf download"):
        load_model_parts(settings)


def test_tiny_models_are_seeded_and_loaded_from_folders(tmp_path, tiny_settings):
    build_tiny_models(tmp_path)
    rebuilt = load_file(tmp_path / "clip" / "open_clip_model.safetensors")
    original = load_file(tiny_model_folder(tiny_settings.model_dir) / "clip" / "open_clip_model.safetensors")
    assert rebuilt.keys() == original.keys()
    assert all(torch.equal(rebuilt[k], original[k]) for k in rebuilt)
    parts = load_stable_diffusion(str(tmp_path / "stable-diffusion"), **CPU)  # the pretrained loading code
    assert parts.unet.config.block_out_channels == [32, 32, 64, 64]
    assert load_captioner("blip2", str(tmp_path / "blip2"), **CPU).model.config.num_query_tokens == 4


def test_random_full_has_the_real_sizes(tmp_path):
    meta = torch.device("meta")  # the architecture without allocating its weights
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    sd = build_stable_diffusion(tmp_path / "tokenizer", meta, torch.float16)
    assert round(count(sd.unet) / 1e6, 1) == 859.5
    assert round(count(build_captioner("blip2", meta, torch.float16).model) / 1e9, 2) == 3.74
    assert round(count(build_captioner("blip", meta, torch.float16).model) / 1e6) == 224
    assert 150e6 < count(build_clip(meta, torch.float16).model) < 152e6  # ViT-B/32
    taesd = build_stable_diffusion(tmp_path / "tokenizer", meta, torch.float16, encoder="taesd")
    assert type(taesd.vae) is AutoencoderTiny and round(count(taesd.vae) / 1e6, 1) == 2.4  # madebyollin/taesd's
    assert round(count(taesd.unet) / 1e6, 1) == 859.5


def test_taesd_loads_in_the_vaes_place_and_the_vae_is_not_read(tiny_settings, tmp_path):
    tiny = tiny_model_folder(tiny_settings.model_dir)
    shutil.copytree(tiny / "stable-diffusion", tmp_path / "sd", ignore=shutil.ignore_patterns("vae"))
    parts = load_stable_diffusion(str(tmp_path / "sd"), taesd=str(tiny / "taesd"), **CPU)  # no vae/ folder at all
    assert type(parts.vae) is AutoencoderTiny and parts.vae.config.encoder_block_out_channels == [8, 8, 8, 8]
    with pytest.raises(ModelUnavailableError, match="FREESEG_SD_MODEL"):
        load_stable_diffusion(str(tmp_path / "sd"), **CPU)  # the VAE's weights are what is missing
    profile = load_model_parts(tiny_settings.model_copy(update={"encoder": "taesd"}))
    assert type(profile.stable_diffusion.vae) is AutoencoderTiny


def test_model_version_says_when_weights_are_random(tmp_path):
    assert model_version(Settings(models="tiny", device="cpu", model_dir=tmp_path)).endswith("tiny-random-weights")
    assert "random" not in model_version(Settings(models="pretrained", device="cpu", model_dir=tmp_path))
    assert model_version(Settings(models="tiny", device="cpu", k=7, model_dir=tmp_path)) == model_version(
        Settings(models="tiny", device="cpu", model_dir=tmp_path)
    )
    assert model_version(Settings(models="tiny", device="cpu", feature_grid=16, model_dir=tmp_path)) != model_version(
        Settings(models="tiny", device="cpu", model_dir=tmp_path)
    )
    taesd = model_version(Settings(models="pretrained", device="cpu", encoder="taesd", model_dir=tmp_path))
    assert taesd.endswith("-taesd") and taesd != model_version(Settings(models="pretrained", device="cpu"))


def test_the_captioner_can_be_kept_on_the_cpu(tiny_settings):
    parts = load_model_parts(tiny_settings.model_copy(update={"captioner_device": "cpu"}))
    assert parts.placement.captioner_device.type == "cpu" and next(parts.captioner.model.parameters()).device.type == "cpu"


def test_attention_uses_torch_scaled_dot_product_attention(tiny_settings):
    # BLIP-2, auto's captioner on a GPU that holds it (transformers' BLIP base has no sdpa attention)
    parts = load_model_parts(tiny_settings.model_copy(update={"captioner": "blip2"}))
    processors = {type(p).__name__ for p in parts.stable_diffusion.unet.attn_processors.values()}
    assert processors == {"AttnProcessor2_0"}  # diffusers' F.scaled_dot_product_attention processor
    assert parts.captioner.model.config._attn_implementation == "sdpa"


def test_loading_the_tiny_profile_warns_of_nothing_about_accelerate(tiny_settings, caplog, recwarn):
    import logging

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):  # their loggers do not propagate by default
        library.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            load_model_parts(tiny_settings)
    finally:
        for library in (diffusers_logging, transformers_logging):
            library.disable_propagation()
    said = [record.getMessage() for record in caplog.records] + [str(w.message) for w in recwarn]
    assert not [line for line in said if "accelerate" in line or "low_cpu_mem_usage" in line]


def test_a_clip_checkpoint_file_keeps_the_activation_of_its_pretrained_tag(tmp_path, monkeypatch):
    import open_clip
    from open_clip.transformer import QuickGELU

    built: list[str] = []
    create = open_clip.create_model

    def create_without_reading(name, pretrained=None, **kwargs):  # a ViT-B-32 file would be 600 MB
        built.append(pretrained)
        return create(name, pretrained=None, **kwargs)

    monkeypatch.setattr(open_clip, "create_model", create_without_reading)
    checkpoint = tmp_path / "vit-b-32-openai.safetensors"
    checkpoint.write_bytes(b"")
    parts = load_clip("ViT-B-32", "openai", checkpoint, **CPU)
    assert built == [str(checkpoint)]
    assert isinstance(parts.model.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert parts.mean == open_clip.OPENAI_DATASET_MEAN
