"""The file selection rule on listings shaped like real repos (no hub, no files)."""

import pytest

from backend.models.selection import CAPTIONER, OPEN_CLIP, STABLE_DIFFUSION, select_files, select_weights

SD_LISTING = """model_index.json v1-5-pruned.ckpt v1-5-pruned-emaonly.safetensors README.md .gitattributes
feature_extractor/preprocessor_config.json safety_checker/config.json safety_checker/model.safetensors
scheduler/scheduler_config.json text_encoder/config.json text_encoder/model.safetensors
text_encoder/model.fp16.safetensors text_encoder/pytorch_model.bin text_encoder/flax_model.msgpack
tokenizer/merges.txt tokenizer/special_tokens_map.json tokenizer/tokenizer_config.json tokenizer/vocab.json
unet/config.json unet/diffusion_pytorch_model.safetensors unet/diffusion_pytorch_model.fp16.safetensors
unet/diffusion_pytorch_model.non_ema.safetensors unet/diffusion_pytorch_model.bin unet/diffusion_pytorch_model.fp16.bin
unet/diffusion_pytorch_model.non_ema.bin vae/config.json vae/diffusion_pytorch_model.safetensors
vae/diffusion_pytorch_model.fp16.safetensors vae/diffusion_pytorch_model.bin""".split()
TOKENIZER = ["tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json",
             "tokenizer/vocab.json"]


@pytest.mark.parametrize("half, suffix", [(False, ""), (True, ".fp16")])
def test_stable_diffusion_gets_one_weight_file_per_component(half, suffix):
    assert select_files(SD_LISTING, STABLE_DIFFUSION, half) == sorted([
        "text_encoder/config.json", f"text_encoder/model{suffix}.safetensors", *TOKENIZER, "unet/config.json",
        f"unet/diffusion_pytorch_model{suffix}.safetensors", "vae/config.json",
        f"vae/diffusion_pytorch_model{suffix}.safetensors",
    ])


def test_a_half_precision_run_takes_the_plain_files_where_there_is_no_fp16_variant():
    listing = [p for p in SD_LISTING if "fp16" not in p]
    weights = select_weights(listing, STABLE_DIFFUSION[0], half=True)
    assert (weights.variant, weights.files) == (None, ("unet/diffusion_pytorch_model.safetensors",))


def test_bin_files_only_when_a_component_has_no_safetensors():
    listing = [p for p in SD_LISTING if not p.startswith("unet/diffusion_pytorch_model") or p.endswith(".bin")]
    weights = select_weights(listing, STABLE_DIFFUSION[0], half=False)
    assert (weights.format, weights.files) == ("bin", ("unet/diffusion_pytorch_model.bin",))


def test_a_sharded_captioner_gets_its_index_and_shards_of_one_format_and_variant():
    listing = ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
               "model-00002-of-00002.safetensors", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
               "pytorch_model-00002-of-00002.bin", "model.safetensors.index.fp16.json",
               "model.fp16-00001-of-00002.safetensors", "model.fp16-00002-of-00002.safetensors",
               "tokenizer.json", "README.md", "subfolder/config.json"]
    assert select_files(listing, CAPTIONER, half=False) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "tokenizer.json"]
    fp16 = select_weights(listing, CAPTIONER[0], half=True)
    assert fp16.variant == "fp16" and fp16.files == ("model.safetensors.index.fp16.json",
                                                     "model.fp16-00001-of-00002.safetensors",
                                                     "model.fp16-00002-of-00002.safetensors")


def test_open_clip_takes_its_own_weight_file_and_no_timm_twin():
    listing = ["open_clip_config.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin",
               "model.safetensors", "pytorch_model.bin", "config.json"]
    assert select_files(listing, OPEN_CLIP, half=True) == ["open_clip_model.safetensors"]


def test_a_repo_without_loadable_weights_is_an_error_naming_the_folder():
    with pytest.raises(ValueError, match="unet"):
        select_files([p for p in SD_LISTING if not p.startswith("unet/diffusion")], STABLE_DIFFUSION, half=False)
