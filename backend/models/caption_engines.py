"""Which engine runs the captioner: ``FREESEG_CAPTION_ENGINE``.

* ``torch``: PyTorch eager;
* ``openvino``: BLIP's vision encoder and its text decoder converted once with ``openvino.convert_model`` and
  compiled for this CPU. The decoder is two graphs over the same weights: the prompt's pass, which also projects
  the image into each layer's cross-attention keys and values, and one step, which takes the past keys and values
  and returns the new token's. transformers' own ``generate`` runs around them (beam search, lengths, every
  setting of the model's generation config), so the tokens are torch's wherever the logits' order is;
* ``auto``: ``openvino`` for BLIP on the CPU where the package is installed, else ``torch``
  (docs/benchmarks.md has the figures that chose it).

Only BLIP's classes are converted; other captioners (BLIP-2) run on torch. The converted graphs are kept under
``MODEL_DIR/engines/captioner-<kind>-<weights>-<dtype>-openvino``, so only the first start pays for the conversion.
Where the engine is missing or fails, the process logs why and captions on torch: a prediction never fails for it.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
import numpy as np
import torch
from transformers import BlipForConditionalGeneration, PreTrainedModel
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

from backend.models.engines import atomic_folder, openvino_installed, progress_logged, weights_digest
from backend.models.loading import CaptionerParts
from backend.settings import CaptionEngineChoice

log = logging.getLogger(__name__)

GRAPHS = ("vision", "prefill", "step")  # the converted files, one .xml and .bin each


def resolve_caption_engine(choice: CaptionEngineChoice, kind_converts: bool, device: torch.device) -> str:
    """The engine ``choice`` names; ``auto`` is openvino for a convertible captioner on a CPU that has it."""
    if choice != "auto":
        return choice
    return "openvino" if kind_converts and device.type == "cpu" and openvino_installed() else "torch"


def captioner_on_engine(parts: CaptionerParts, choice: CaptionEngineChoice, cache_root: Path) -> CaptionerParts:
    """``parts`` with its model on the engine ``choice`` resolves to (its converted graphs cached under
    ``cache_root``); the parts as they were (with a logged reason) where that engine cannot run them."""
    model = parts.model
    converts = isinstance(model, BlipForConditionalGeneration)
    engine = resolve_caption_engine(choice, converts, model.device)
    if engine == "torch":
        return parts
    try:
        if not converts:
            raise TypeError(f"only BLIP's captioner converts, not {type(model).__name__}")
        dtype_name = str(model.dtype).removeprefix("torch.")
        folder = cache_root / f"captioner-{parts.kind}-{weights_digest(model)}-{dtype_name}-{engine}"
        engine_model = _openvino_blip(model, _image_size(parts), folder)
    except Exception as error:  # noqa: BLE001: any failure of an optional engine falls back, with its reason
        log.warning("FREESEG_CAPTION_ENGINE=%s: the %s engine could not run the captioner (%s: %s); "
                    "captioning on torch instead", choice, engine, type(error).__name__, error)
        return parts
    return CaptionerParts(kind=parts.kind, model=engine_model, processor=parts.processor)


def caption_engine(model: PreTrainedModel) -> str:
    """The engine a captioner's model runs on."""
    return model.__dict__.get("engine", "torch")


def eager_model(model: PreTrainedModel) -> PreTrainedModel:
    """The torch model an engine's model stands in for (the model itself on torch)."""
    return model.__dict__.get("eager", model)


def _image_size(parts: CaptionerParts) -> int:
    return parts.processor.image_processor.size["height"]


def _openvino_blip(model: BlipForConditionalGeneration, image_size: int, folder: Path) -> PreTrainedModel:
    """A shallow copy of ``model`` whose vision model and text decoder's forward run the converted graphs; the
    model itself is left as it was (torch eager), and kept as the copy's ``eager``."""
    import openvino

    if not all((folder / f"{name}.xml").exists() for name in GRAPHS):
        _convert(model, image_size, folder)
    core = openvino.Core()
    precision = {torch.bfloat16: "bf16", torch.float16: "f16"}.get(model.dtype, "f32")
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    vision, prefill, step = (core.compile_model(str(folder / f"{name}.xml"), "CPU", config) for name in GRAPHS)
    decoder = copy.copy(model.text_decoder)
    decoder.forward = _DecoderForward(prefill, step, decoder.config)
    engine_model = copy.copy(model)
    engine_model._modules = {**model._modules, "vision_model": _VisionOnEngine(vision, model.dtype),
                             "text_decoder": decoder}
    engine_model.__dict__.update(engine="openvino", eager=model)  # plain attributes: no submodule, no weights
    return engine_model


def _convert(model: BlipForConditionalGeneration, image_size: int, folder: Path) -> None:
    """The three graphs, traced on small examples with every dimension but the channels left dynamic."""
    import openvino

    decoder, dtype = model.text_decoder, model.dtype
    config = decoder.config
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    head_size, width = config.hidden_size // heads, model.config.vision_config.hidden_size
    beams, prompt, past, patches = 2, 3, 4, 5
    pixels = torch.zeros(1, 3, image_size, image_size)
    prefill_example = (torch.ones(beams, prompt, dtype=torch.long), torch.ones(beams, prompt, dtype=torch.long),
                       torch.zeros(beams, patches, width))
    past_kv = [torch.zeros(beams, heads, past, head_size)] * (2 * layers)
    cross_kv = [torch.zeros(beams, heads, patches, head_size)] * (2 * layers)
    step_example = (torch.ones(beams, 1, dtype=torch.long), torch.ones(beams, past + 1, dtype=torch.long),
                    *past_kv, *cross_kv)
    with progress_logged(f"converting the captioner to OpenVINO (once; kept in {folder})"), warnings.catch_warnings(), \
            torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the cache's Python branches: fixed per graph
        graphs = {
            "vision": openvino.convert_model(_VisionGraph(model.vision_model, dtype).eval(), example_input=pixels,
                                             input=[openvino.PartialShape([-1, 3, image_size, image_size])]),
            "prefill": openvino.convert_model(_PrefillGraph(decoder, dtype).eval(), example_input=prefill_example),
            "step": openvino.convert_model(_StepGraph(decoder, dtype).eval(), example_input=step_example),
        }
    with atomic_folder(folder) as staging:
        for name, graph in graphs.items():
            openvino.save_model(graph, staging / f"{name}.xml", compress_to_fp16=False)


def _filled_cache(config, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A cache holding these (keys, values) per layer, set as they are: DynamicCache's lazy start would
    concatenate onto an empty 1-D tensor, which a traced graph cannot."""
    cache = DynamicCache(config=config)
    for layer, (keys, values) in zip(cache.layers, pairs):
        layer.keys, layer.values, layer.device, layer.is_initialized = keys, values, keys.device, True
    return cache


def _flat(cache: DynamicCache) -> list[torch.Tensor]:
    return [tensor.float() for layer in cache.layers for tensor in (layer.keys, layer.values)]


def _pairs(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(tensors[i].to(dtype), tensors[i + 1].to(dtype)) for i in range(0, len(tensors), 2)]


class _VisionGraph(torch.nn.Module):
    """pixel values (float32) -> the image embeddings the text decoder attends to (float32)."""

    def __init__(self, vision_model: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.vision_model, self.dtype = vision_model, dtype

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values=pixels.to(self.dtype))[0].float()


class _PrefillGraph(torch.nn.Module):
    """The prompt's pass: (input ids, attention mask, image embeddings) -> the last position's logits, each
    layer's self-attention keys and values, then each layer's cross-attention keys and values."""

    def __init__(self, decoder: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.decoder, self.dtype = decoder, dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image: torch.Tensor) -> tuple:
        config = self.decoder.config
        heads = config.num_attention_heads
        empty = image.new_zeros((input_ids.shape[0], heads, 0, config.hidden_size // heads), dtype=self.dtype)
        layers = [(empty, empty)] * config.num_hidden_layers
        cache = EncoderDecoderCache(_filled_cache(config, layers), _filled_cache(config, layers))
        output = self.decoder(input_ids=input_ids, attention_mask=attention_mask,
                              encoder_hidden_states=image.to(self.dtype), cache=cache, use_cache=True)
        return (output.logits[:, -1].float(), *_flat(cache.self_attention_cache), *_flat(cache.cross_attention_cache))


class _StepGraph(torch.nn.Module):
    """One step: (input ids, attention mask over past and new, the self-attention keys and values so far, the
    cross-attention ones) -> the last position's logits and the new positions' keys and values per layer."""

    def __init__(self, decoder: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.decoder, self.dtype = decoder, dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor) -> tuple:
        config = self.decoder.config
        half = len(past) // 2
        cache = EncoderDecoderCache(_filled_cache(config, _pairs(list(past[:half]), self.dtype)),
                                    _filled_cache(config, _pairs(list(past[half:]), self.dtype)))
        for layer in range(config.num_hidden_layers):
            cache.is_updated[layer] = True  # the cross-attention reads its keys and values from the cache
        # encoder_hidden_states only says "attend to the image": its keys and values are the cache's
        output = self.decoder(input_ids=input_ids, attention_mask=attention_mask,
                              encoder_hidden_states=past[half].to(self.dtype), cache=cache, use_cache=True)
        new = input_ids.shape[1]
        return (output.logits[:, -1].float(), *[t[:, :, -new:] for t in _flat(cache.self_attention_cache)])


class _VisionOnEngine(torch.nn.Module):
    """Stands in for BLIP's vision model in its ``generate``: the compiled vision graph."""

    def __init__(self, compiled, dtype: torch.dtype):
        super().__init__()
        self.compiled, self.dtype = compiled, dtype

    def forward(self, pixel_values: torch.Tensor, **_: object) -> tuple[torch.Tensor]:
        return (torch.from_numpy(self.compiled(pixel_values.float().cpu().numpy())[0]).to(self.dtype),)


class _DecoderForward:
    """Stands in for the text decoder's forward in transformers' ``generate``: the prefill graph on the first
    call, then the step graph, with the keys and values kept in generate's own cache (which beam search reorders).
    The image attention mask BLIP passes is all ones, so the graphs take none."""

    def __init__(self, prefill, step, config):
        self.prefill, self.step, self.config = prefill, step, config

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 encoder_hidden_states: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                 cache: DynamicCache | None = None, **_: object) -> CausalLMOutputWithCrossAttentions:
        if attention_mask is None:
            past = cache.get_seq_length() if cache is not None else 0
            attention_mask = torch.ones(input_ids.shape[0], past + input_ids.shape[1], dtype=torch.long)
        ids, mask = input_ids.cpu().numpy(), attention_mask.long().cpu().numpy()
        if isinstance(cache, EncoderDecoderCache) and cache.is_updated.get(0):
            past_kv = [_numpy(t) for c in (cache.self_attention_cache, cache.cross_attention_cache) for t in _flat(c)]
            logits, *new = self.step([ids, mask, *past_kv]).to_tuple()
            dtype = cache.self_attention_cache.layers[0].keys.dtype
            for layer, (keys, values) in enumerate(_pairs([torch.from_numpy(t) for t in new], dtype)):
                cache.self_attention_cache.layers[layer].update(keys, values)
        else:
            logits, *kv = self.prefill([ids, mask, _numpy(encoder_hidden_states)]).to_tuple()
            dtype = encoder_hidden_states.dtype
            pairs = _pairs([torch.from_numpy(t) for t in kv], dtype)
            half = len(pairs) // 2
            cache = EncoderDecoderCache(_filled_cache(self.config, pairs[:half]),
                                        _filled_cache(self.config, pairs[half:]))
            for layer in range(half):
                cache.is_updated[layer] = True
        return CausalLMOutputWithCrossAttentions(logits=torch.from_numpy(logits)[:, None, :], cache=cache)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.float().cpu().numpy()
