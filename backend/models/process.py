"""The process's segmenter: the pipeline over the models the settings name, built once per process.

Every entry point (server, CLI, queue workers, bench) asks ``process_segmenter`` rather than
building its own, so one process loads each model once; threads are set from the cores
available before the models load.
"""

from __future__ import annotations

import gc
from functools import lru_cache

from backend.models.assembly import load_model_parts, resolve_device
from backend.models.caption_engines import captioner_on_engine
from backend.models.captioners import CAPTIONERS
from backend.models.engines import feature_extractor
from backend.models.identity import feature_settings, models_fingerprint
from backend.pipeline.caption import Captioner
from backend.pipeline.clip_embeddings import ClipEmbedder
from backend.pipeline.features import FeatureNetwork
from backend.pipeline.fidelity import stage_rules
from backend.pipeline.refine import Refiner
from backend.pipeline.sd_text import StableDiffusionText
from backend.pipeline.segmenter import Segmenter
from backend.settings import Settings
from backend.threads import configure_threads


@lru_cache(maxsize=2)
def process_segmenter(settings: Settings) -> Segmenter:
    """The segmenter for these settings; models load on the first call only."""
    threads = configure_threads(resolve_device(settings.device, settings.dtype)[0].type, settings.crf_processes,
                                settings.torch_threads)
    parts = load_model_parts(settings)
    placement = parts.placement
    device, dtype = placement.device, placement.dtype
    fingerprint = models_fingerprint(settings, dtype)
    stable_diffusion_text = StableDiffusionText(parts.stable_diffusion, device)
    network = FeatureNetwork(parts.stable_diffusion, feature_settings(settings), stable_diffusion_text)
    clip = ClipEmbedder(parts.clip, device, dtype)
    rules = stage_rules(settings.fidelity, clip, stable_diffusion_text, settings.nouns)
    engines_folder = settings.model_dir / "engines"
    features = feature_extractor(network, settings.engine, engines_folder, fingerprint)
    captioner, nlp = parts.captioner, parts.nlp
    # what the feature network does not use (the U-Net's last blocks, the VAE's decoder: 0.6 GB of SD1.5 in
    # float32, held in reference cycles) goes before the captioner's engine compiles: the process's peak memory
    del parts
    gc.collect()
    return Segmenter(
        captioner=Captioner(captioner_on_engine(captioner, settings.caption_engine, engines_folder),
                            CAPTIONERS[captioner.kind].generation, placement.captioner_device,
                            placement.captioner_dtype, rules.caption_length),
        features=features,
        clip=clip,
        nlp=nlp,
        fingerprint=fingerprint,
        device=device,
        refiner=Refiner(device, threads.crf_processes, rules.pamr_threshold),
        overlap_caption=device.type == "cuda",
        working_max_side=settings.working_max_side,
        rules=rules,
    )
