"""Which engine runs the captioner: ``FREESEG_CAPTION_ENGINE``.

* ``torch``: PyTorch eager;
* ``openvino``: BLIP's vision encoder and its text decoder converted once with ``openvino.convert_model`` and
  compiled for this CPU. The decoder is two graphs that share no weights (each compiled graph holds its own
  copy): ``cross`` projects the image into each layer's cross-attention keys and values, once per caption, and
  ``step`` takes the new tokens, the past self-attention keys and values (none for the prompt's pass) and the
  cross-attention ones, and returns the last token's logits and the new tokens' keys and values.
  transformers' own ``generate`` runs around them (beam search, lengths, every setting of the model's generation
  config), so the tokens are torch's wherever the logits' order is. The engine's model keeps none of torch's
  weights (the converted graphs hold them): whoever compares with torch eager loads its own;
* ``auto``: torch. On a quiet CPU without bfloat16 the converted captioner wrote the same tokens only 1.04x
  faster (photo by photo) and held 1.6 GB more at the process's peak, past the 8 GB a laptop can give
  (docs/benchmarks.md); ``openvino`` is the choice for a shared machine, where torch's threads suffer more from
  other processes.

Only BLIP's classes are converted; other captioners (BLIP-2) run on torch. The converted graphs are kept under
``MODEL_DIR/engines/captioner-<kind>-<weights>-<dtype>-openvino-v<GRAPHS_VERSION>``, so only the first start pays
for the conversion.
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

from backend.models.engines import atomic_folder, progress_logged, weights_digest
from backend.models.loading import CaptionerParts
from backend.settings import CaptionEngineChoice

log = logging.getLogger(__name__)

GRAPHS = ("vision", "cross", "step")  # the converted files, one .xml and .bin each
GRAPHS_VERSION = 2  # in the cache folder's name: graphs converted by an earlier version are converted again


def resolve_caption_engine(choice: CaptionEngineChoice) -> str:
    """The engine ``choice`` names; ``auto`` is torch (the module's docstring says why)."""
    return "torch" if choice == "auto" else choice


def captioner_on_engine(parts: CaptionerParts, choice: CaptionEngineChoice, cache_root: Path) -> CaptionerParts:
    """``parts`` with its model on the engine ``choice`` resolves to (its converted graphs cached under
    ``cache_root``); the parts as they were (with a logged reason) where that engine cannot run them."""
    model = parts.model
    engine = resolve_caption_engine(choice)
    if engine == "torch":
        return parts
    try:
        if not isinstance(model, BlipForConditionalGeneration):
            raise TypeError(f"only BLIP's captioner converts, not {type(model).__name__}")
        dtype_name = str(model.dtype).removeprefix("torch.")
        folder = cache_root / f"captioner-{parts.kind}-{weights_digest(model)}-{dtype_name}-{engine}-v{GRAPHS_VERSION}"
        engine_model = _openvino_blip(model, _image_size(parts), folder)
    except Exception as error:  # noqa: BLE001: any failure of an optional engine falls back, with its reason
        log.warning("FREESEG_CAPTION_ENGINE=%s: the %s engine could not run the captioner (%s: %s); "
                    "captioning on torch instead", choice, engine, type(error).__name__, error)
        return parts
    return CaptionerParts(kind=parts.kind, model=engine_model, processor=parts.processor)


def caption_engine(model: PreTrainedModel) -> str:
    """The engine a captioner's model runs on."""
    return model.__dict__.get("engine", "torch")


def _image_size(parts: CaptionerParts) -> int:
    return parts.processor.image_processor.size["height"]


def _openvino_blip(model: BlipForConditionalGeneration, image_size: int, folder: Path) -> PreTrainedModel:
    """A shallow copy of ``model`` whose vision model and text decoder's forward run the converted graphs, and
    which holds none of its weights (so that they are freed with ``model``); ``model`` is left as it was."""
    import openvino

    if not all((folder / f"{name}.xml").exists() for name in GRAPHS):
        _convert(model, image_size, folder)
    core = openvino.Core()
    precision = {torch.bfloat16: "bf16", torch.float16: "f16"}.get(model.dtype, "f32")
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    vision, cross, step = (core.compile_model(str(folder / f"{name}.xml"), "CPU", config) for name in GRAPHS)
    decoder = _weightless(model.text_decoder)
    decoder.forward = _DecoderForward(cross, step, decoder.config)
    engine_model = _weightless(model)
    engine_model._modules = {"vision_model": _VisionOnEngine(vision, model.dtype), "text_decoder": decoder}
    engine_model.__dict__.update(engine="openvino")  # a plain attribute: no submodule
    return engine_model


def _weightless(module: PreTrainedModel) -> PreTrainedModel:
    """A shallow copy of ``module`` with no submodules and, for ``generate``'s ``device`` and ``dtype``, one empty
    parameter of the model's device and dtype in place of its own."""
    shell = copy.copy(module)
    marker = torch.nn.Parameter(torch.empty(0, device=module.device, dtype=module.dtype), requires_grad=False)
    shell._modules, shell._parameters, shell._buffers = {}, {"device_marker": marker}, {}
    return shell


def _convert(model: BlipForConditionalGeneration, image_size: int, folder: Path) -> None:
    """The three graphs, traced on small examples with every dimension but the channels left dynamic (the step's
    on two new tokens, so that neither one token nor an empty past is built in)."""
    import openvino

    decoder, dtype = model.text_decoder, model.dtype
    config = decoder.config
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    head_size, width = config.hidden_size // heads, model.config.vision_config.hidden_size
    beams, new, past, patches = 2, 2, 4, 5
    pixels = torch.zeros(1, 3, image_size, image_size)
    past_kv = [torch.zeros(beams, heads, past, head_size)] * (2 * layers)
    cross_kv = [torch.zeros(beams, heads, patches, head_size)] * (2 * layers)
    step_example = (torch.ones(beams, new, dtype=torch.long), torch.ones(beams, past + new, dtype=torch.long),
                    *past_kv, *cross_kv)
    with progress_logged(f"converting the captioner to OpenVINO (once; kept in {folder})"), warnings.catch_warnings(), \
            torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the cache's Python branches: fixed per graph
        graphs = {
            "vision": openvino.convert_model(_VisionGraph(model.vision_model, dtype).eval(), example_input=pixels,
                                             input=[openvino.PartialShape([-1, 3, image_size, image_size])]),
            "cross": openvino.convert_model(_CrossGraph(decoder, dtype).eval(),
                                            example_input=torch.zeros(beams, patches, width)),
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
    """Each layer's keys then values, in float32 (a float32 cache's own tensors, not copies)."""
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


class _CrossGraph(torch.nn.Module):
    """Image embeddings (float32) -> each layer's cross-attention keys and values (float32), (B, heads, P, head):
    the projections BLIP's cross-attention makes of the image, made once per caption rather than per step."""

    def __init__(self, decoder: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        attentions = [layer.crossattention.self for layer in decoder.bert.encoder.layer]
        self.projections = torch.nn.ModuleList(
            projection for attention in attentions for projection in (attention.key, attention.value))
        self.head_size, self.dtype = attentions[0].attention_head_size, dtype

    def forward(self, image: torch.Tensor) -> tuple:
        image = image.to(self.dtype)
        shape = (*image.shape[:-1], -1, self.head_size)
        return tuple(projection(image).view(shape).transpose(1, 2).float() for projection in self.projections)


class _StepGraph(torch.nn.Module):
    """One step: (input ids, attention mask over past and new, the self-attention keys and values so far (none
    for the prompt's pass), the cross-attention ones) -> the last position's logits and the new positions' keys
    and values per layer."""

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
    """Stands in for the text decoder's forward in transformers' ``generate``: on the first call the cross graph
    and the step graph over the prompt with no past, then the step graph alone, with the keys and values kept in
    generate's own cache (which beam search reorders). The image attention mask BLIP passes is all ones, so the
    graphs take none. Inputs are handed to OpenVINO without a copy (``share_inputs``): the cross-attention keys
    and values alone are tens of MB per step."""

    def __init__(self, cross, step, config):
        self.cross, self.step, self.config = cross, step, config

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 encoder_hidden_states: torch.Tensor | None = None, encoder_attention_mask: torch.Tensor | None = None,
                 cache: DynamicCache | None = None, **_: object) -> CausalLMOutputWithCrossAttentions:
        if attention_mask is None:
            past = cache.get_seq_length() if cache is not None else 0
            attention_mask = torch.ones(input_ids.shape[0], past + input_ids.shape[1], dtype=torch.long)
        ids, mask = _numpy(input_ids), _numpy(attention_mask.long())
        if not (isinstance(cache, EncoderDecoderCache) and cache.is_updated.get(0)):
            dtype = encoder_hidden_states.dtype
            cross = _pairs([torch.from_numpy(t) for t in self.cross([_numpy(encoder_hidden_states.float())],
                                                                    share_inputs=True).to_tuple()], dtype)
            heads, head_size = cross[0][0].shape[1], cross[0][0].shape[3]
            empty = torch.zeros(input_ids.shape[0], heads, 0, head_size, dtype=dtype)
            cache = _ImageCache(_filled_cache(self.config, [(empty, empty)] * len(cross)),
                                _filled_cache(self.config, cross))
            for layer in range(len(cross)):
                cache.is_updated[layer] = True
        past_kv = [_numpy(t) for c in (cache.self_attention_cache, cache.cross_attention_cache) for t in _flat(c)]
        logits, *new = self.step([ids, mask, *past_kv], share_inputs=True).to_tuple()
        dtype = cache.self_attention_cache.layers[0].keys.dtype
        for layer, (keys, values) in enumerate(_pairs([torch.from_numpy(t) for t in new], dtype)):
            cache.self_attention_cache.layers[layer].update(keys, values)
        return CausalLMOutputWithCrossAttentions(logits=torch.from_numpy(logits)[:, None, :], cache=cache)


class _ImageCache(EncoderDecoderCache):
    """generate's cache, whose beam search reorders the self-attention keys and values only: the cross-attention
    ones are the same for every beam of an image (its embeddings repeated per beam), and beams are reordered among
    one image's, so reordering them would copy tens of MB per step to the same values."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.self_attention_cache.reorder_cache(beam_idx)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A C-contiguous numpy view of a CPU tensor (a copy only where it is not contiguous)."""
    return np.ascontiguousarray(tensor.cpu().numpy())
