"""``freesegdiff bench``: throughput, latency and re-prompt cost, against a naive baseline.

Everything is measured in one run on the same images and models, so ratios hold on a
noisy machine. The naive mode works like the authors' released code: one image at a
time, scikit-learn K-means, the CPU CRF for each cluster, CLIP called once per cluster.
"""

from __future__ import annotations

import gc
import io
import json
import os
import platform
import resource
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans

from backend.benchmark.caption_agreement import folder_agreement
from backend.benchmark.floors import gemm_peak_gflops, stage_floors, stage_gflops, synchronize
from backend.storage.feature_cache import ProcessCache
from backend.images import decode_image, read_image_file
from backend.exports.brush_results import brush_results
from backend.pipeline.clip_embeddings import TextImageEmbedder
from backend.pipeline.clustering import canonical_order, cluster_feature_grid
from backend.pipeline.refine import PendingMasks, Refiner, refine_masks
from backend.options import SegmentOptions
from backend.pipeline.segmenter import Segmenter
from backend.models.caption_engines import caption_engine
from backend.models.assembly import load_captioner_parts
from backend.models.process import process_segmenter
from backend.models.identity import model_version
from backend.pipeline.vocabulary import Label, labels_from_names
from backend.options import RefineMethod
from backend.settings import Settings

# Pascal VOC's 20 object classes: a realistic label set.
VOC_LABELS = ("aeroplane,bicycle,bird,boat,bottle,bus,car,cat,chair,cow,dining table,dog,horse,motorbike,person,"
              "potted plant,sheep,sofa,train,tv monitor").split(",")


@dataclass(frozen=True)
class BenchConfig:
    profile: str
    device: str
    images: int
    batch: int
    image_dir: Path | None = None
    json_path: Path | None = None
    dtype: str = "auto"  # FREESEG_DTYPE for this run
    image_size: tuple[int, int] = (500, 375)  # (width, height) of the synthetic images
    compare_sizes: tuple[tuple[int, int], ...] = ()  # measure only single-image predictions at each of these sizes
    naive: bool = True  # also run the naive mode (minutes per image on big photos: its CRF runs at full size)
    compare_dtype: str | None = None  # measure only the features stage and the cluster maps against this dtype
    engine: str | None = None  # FREESEG_ENGINE for this run; None: the settings' own
    compare_engines: tuple[str, ...] = ()  # measure only the features stage of these engines against float32 torch
    encoders: tuple[str, ...] = ()  # also time one image at a time with each of these FREESEG_ENCODERs, side by side
    caption_agreement: Path | None = None  # photos to caption with torch eager and the captioner's engine
    floors: bool = True  # each stage's GFLOP and floor from the measured float32 GEMM peak (backend.benchmark.floors)


def synthetic_images(count: int, seed: int = 0, size: tuple[int, int] = (375, 500)) -> list[np.ndarray]:
    """Photo-like test images: a sky gradient, ground, a few solid shapes, sensor noise."""
    rng = np.random.default_rng(seed)
    height, width = size
    rows, columns = np.mgrid[0:height, 0:width]
    images = []
    for _ in range(count):
        horizon = int(height * rng.uniform(0.35, 0.65))
        image = np.zeros((height, width, 3), dtype=np.float32)
        image[:] = rng.uniform(60, 200, 3)
        image[:horizon] = np.linspace(rng.uniform(120, 255, 3), rng.uniform(60, 200, 3), horizon)[:, None, :]
        for _ in range(rng.integers(2, 5)):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            ry, rx = rng.uniform(20, height / 3), rng.uniform(20, width / 3)
            image[((rows - cy) / ry) ** 2 + ((columns - cx) / rx) ** 2 < 1] = rng.uniform(0, 255, 3)
        image += rng.normal(0, 8, image.shape)
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return images


class PerClusterClip:
    """The released code's CLIP use: one call per masked image."""

    def __init__(self, clip: TextImageEmbedder):
        self.clip = clip

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.clip.embed_texts(texts)

    def embed_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate([self.clip.embed_images([image]) for image in images])


class PerClusterRefiner(Refiner):
    """The released code's refinement: a new CRF for each cluster, one after another, on the inference thread."""

    def __init__(self) -> None:
        super().__init__("cpu", crf_processes=0)

    def start(
        self, image: np.ndarray, masks: np.ndarray, method: RefineMethod, full_image: np.ndarray | None = None
    ) -> PendingMasks:
        def one_cluster_at_a_time() -> np.ndarray:
            if len(masks) == 0:
                return refine_masks(image, masks, method, "cpu", full_image)
            refined = np.concatenate([refine_masks(image, mask[None], method, "cpu", full_image) for mask in masks])
            return refine_masks(full_image if full_image is not None else image, refined, "none")  # the first mask wins

        return one_cluster_at_a_time


def naive_segmenter(fast: Segmenter) -> Segmenter:
    """The baseline: scikit-learn K-means (10 inits, one after another), per-cluster CLIP, per-cluster CRFs in line."""
    return Segmenter(fast.captioner, fast.features, PerClusterClip(fast.clip), fast.nlp, fast.fingerprint, "cpu",
                     refiner=PerClusterRefiner(), working_max_side=fast.working_max_side, clustering=scikit_learn_kmeans)


def scikit_learn_kmeans(features: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The released code's clustering: scikit-learn's K-means with 10 inits, in the canonical cluster order."""
    points = features.reshape(features.shape[0], -1).T
    assignment = KMeans(k, n_init=10, random_state=seed).fit_predict(points)
    return canonical_order(assignment).reshape(features.shape[1:])


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else 0.0


def _timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _cpu_seconds(segmenter: Segmenter) -> float:
    """CPU time used so far by this process (all threads) and by the segmenter's CRF processes.

    The processes' share is read from Linux's /proc; a process that is gone counts nothing.
    """
    total = time.process_time()
    for pid in segmenter.refiner.pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def cluster_agreement(first: np.ndarray, second: np.ndarray) -> float:
    """Share of pixels of two cluster maps that agree once clusters are matched one to one (Hungarian)."""
    size = int(max(first.max(), second.max())) + 1
    overlap = np.zeros((size, size), dtype=np.int64)
    np.add.at(overlap, (first.ravel(), second.ravel()), 1)
    rows, columns = linear_sum_assignment(-overlap)
    return float(overlap[rows, columns].sum() / first.size)


def _bench_images(config: BenchConfig) -> list[np.ndarray]:
    if config.image_dir:
        paths = sorted(p for p in config.image_dir.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
        return [read_image_file(p) for p in paths[: config.images]]
    width, height = config.image_size
    return synthetic_images(config.images, size=(height, width))


def _bench_settings(config: BenchConfig, settings: Settings) -> Settings:
    """``settings`` with the run's profile, device, dtype and engine."""
    return settings.model_copy(update={"models": config.profile, "device": config.device, "dtype": config.dtype,
                                       "engine": config.engine or settings.engine})


def _dtype_name(segmenter: Segmenter) -> str:
    return str(getattr(segmenter.features, "dtype", "unknown")).removeprefix("torch.")


def _engine_name(segmenter: Segmenter) -> str:
    return getattr(segmenter.features, "engine", "unknown")


def compare_features(config: BenchConfig, settings: Settings) -> dict:
    """The features stage in several (dtype, engine) variants, side by side on the same images, each against a
    reference: its time and how far its cluster maps agree with the reference's.

    ``--compare-dtype D``: ``--dtype`` against D, both on ``--engine``. ``--compare-engines A,B``: each engine in
    ``--dtype`` against float32 torch eager, the baseline every engine must agree with.
    """
    settings = _bench_settings(config, settings)
    reference = (config.compare_dtype or "float32", "torch" if config.compare_engines else settings.engine)
    variants = [reference] + [(config.dtype, engine) for engine in config.compare_engines or (settings.engine,)]
    extractors = []
    for dtype, engine in variants:
        extractors.append(process_segmenter(settings.model_copy(update={"dtype": dtype, "engine": engine})).features)
        process_segmenter.cache_clear()  # keep the feature network only: the captioner and CLIP are not timed
    names = [f"{str(e.dtype).removeprefix('torch.')} {e.engine}" for e in extractors]
    images = _bench_images(config)
    for extract in extractors:
        extract(images[:1])  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in names}
    agreements: dict[str, list[float]] = {name: [] for name in names[1:]}
    options = settings.segment_options
    for image in images:
        grids = []
        for name, extract in zip(names, extractors):
            start = time.perf_counter()
            features = extract([image])[0]
            synchronize(extract.device)
            seconds[name].append(time.perf_counter() - start)
            grids.append(cluster_feature_grid(features.astype(np.float32), options.k, options.seed, extract.device))
        for name, grid in zip(names[1:], grids[1:]):
            agreements[name].append(cluster_agreement(grid, grids[0]))
    medians = {name: 1000 * statistics.median(values) for name, values in seconds.items()}
    rows = [
        {"dtype": str(extract.dtype).removeprefix("torch."), "engine": extract.engine, "features_ms": medians[name],
         "speedup": medians[names[0]] / medians[name],  # > 1: faster than the reference
         "cluster_agreement_min": min(agreements[name]), "cluster_agreement_median": statistics.median(agreements[name])}
        for name, extract in zip(names[1:], extractors[1:])
    ]
    figures = {
        "profile": config.profile, "device": str(extractors[0].device), "images": len(images),
        "image_size": list(images[0].shape[1::-1]), "k": options.k,
        "reference": {"dtype": str(extractors[0].dtype).removeprefix("torch."), "engine": extractors[0].engine,
                      "features_ms": medians[names[0]]},
        "variants": rows,  # the features stage: the VAE encoder and the U-Net to the feature level, median per image
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "hardware": _hardware(extractors[0].device), "date": time.strftime("%Y-%m-%d"),
    }
    print(f"freesegdiff bench: the features stage, {config.profile} on {figures['device']}, {len(images)} images, "
          f"against {names[0]} ({medians[names[0]]:.0f} ms)")
    for name, row in zip(names[1:], rows):
        print(f"  {name:>18}  {row['features_ms']:7.0f} ms (x{row['speedup']:.2f})  cluster maps agree on "
              f"{100 * row['cluster_agreement_min']:.1f}% of pixels or more (median "
              f"{100 * row['cluster_agreement_median']:.1f}%)")
    _write(figures, config.json_path)
    return figures


def _write(figures: dict, path: Path | None) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=2))


class _PeakMemory:
    """The largest resident set size of this process while it is entered, sampled every few milliseconds (Linux)."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        self._done = threading.Event()

    def __enter__(self) -> _PeakMemory:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
        while True:
            resident = int(Path("/proc/self/statm").read_text().split()[1]) * page_mb
            self.peak_mb = max(self.peak_mb, resident)
            if self._done.wait(0.005):
                return


def compare_sizes(config: BenchConfig, settings: Settings) -> dict:
    """One image at a time at each size, sizes taking turns: JPEG decoding, encode, segment and brush results.

    This is what a /predict of a photo costs (no cache), so the sizes' ratios hold on a busy machine.
    """
    settings = _bench_settings(config, settings)
    segmenter = process_segmenter(settings)
    labels = labels_from_names(VOC_LABELS)
    options = settings.segment_options
    jpegs = {size: [_jpeg(image) for image in synthetic_images(config.images, size=size[::-1])]
             for size in config.compare_sizes}
    figures: dict[tuple[int, int], dict] = {size: defaultdict(list) for size in config.compare_sizes}

    def predict(data: bytes, measured: dict) -> None:
        start, cpu_start = time.perf_counter(), _cpu_seconds(segmenter)
        with _PeakMemory() as memory:
            image = decode_image(data, settings.image_limits)
            decoded = time.perf_counter()
            brush_results(segmenter.segment_image(image, labels, options), "tag", "image")
        measured["seconds"].append(time.perf_counter() - start)
        measured["decode_seconds"].append(decoded - start)
        measured["cpu_seconds"].append(_cpu_seconds(segmenter) - cpu_start)
        measured["peak_rss_mb"].append(memory.peak_mb)

    predict(jpegs[config.compare_sizes[0]][0], defaultdict(list))  # warm-up
    for index in range(config.images):
        for size in config.compare_sizes:
            predict(jpegs[size][index], figures[size])
    summary = {
        f"{width}x{height}": {"megapixels": width * height / 1e6,
                              "latency_p50_ms": 1000 * statistics.median(m["seconds"]),
                              "decode_p50_ms": 1000 * statistics.median(m["decode_seconds"]),
                              "cpu_p50_ms": 1000 * statistics.median(m["cpu_seconds"]),  # all threads, CRF processes
                              "peak_rss_mb": max(m["peak_rss_mb"])}
        for (width, height), m in figures.items()
    }
    first = next(iter(summary.values()))  # the first size given: the others' ratios are to it
    for row in summary.values():
        row["latency_ratio"] = row["latency_p50_ms"] / first["latency_p50_ms"]
        row["cpu_ratio"] = row["cpu_p50_ms"] / first["cpu_p50_ms"]
    result = {"profile": config.profile, "device": str(segmenter.device), "dtype": _dtype_name(segmenter),
              "engine": _engine_name(segmenter),
              "images": config.images, "refine": options.refine, "working_max_side": segmenter.working_max_side,
              "crf_processes": segmenter.refiner.crf_processes, "sizes": summary,
              "hardware": _hardware(segmenter.device), "date": time.strftime("%Y-%m-%d")}
    print(f"freesegdiff bench: one image at a time, {config.profile} on {result['device']} in {result['dtype']}, "
          f"refine={options.refine} at most {segmenter.working_max_side} px, {config.images} images per size")
    for name, row in summary.items():
        print(f"  {name:>11} ({row['megapixels']:5.1f} MP)  p50 {row['latency_p50_ms']:7.0f} ms (x{row['latency_ratio']:.2f})"
              f"  CPU {row['cpu_p50_ms']:7.0f} ms (x{row['cpu_ratio']:.2f})  decoding {row['decode_p50_ms']:5.0f} ms"
              f"  peak RSS {row['peak_rss_mb']:6.0f} MB")
    _write(result, config.json_path)
    return result


def run_bench(config: BenchConfig, settings: Settings) -> dict:
    """Measure, print a summary, and return the figures (also written to ``config.json_path``)."""
    if config.compare_dtype or config.compare_engines:
        return compare_features(config, settings)
    if config.compare_sizes:
        return compare_sizes(config, settings)
    figures = measure_predictions(config, _bench_settings(config, settings))
    if config.encoders:
        figures["encoders"] = compare_encoders(config, settings)
    _print(figures)
    _write(figures, config.json_path)
    return figures


@dataclass
class _Predictions:
    """Predictions of whole batches with their brush results, as /predict makes them; results' seconds recorded."""

    labels: list[Label]
    options: SegmentOptions
    device: torch.device  # the features' device, whichever segmenter runs: waited for before a time is read
    stages: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def __call__(self, segmenter: Segmenter, batches: Sequence[Sequence[np.ndarray]]) -> None:
        """Predictions for every image, results included; batches overlap as ``segment_batches`` allows."""
        for _, segmentations in segmenter.segment_batches(enumerate(batches), self.labels, self.options):
            for segmentation in segmentations:
                start = time.perf_counter()
                brush_results(segmentation, "tag", "image")
                self.stages["results"].append(time.perf_counter() - start)
        synchronize(self.device)

    def observing(self, segmenter: Segmenter) -> Segmenter:
        """``segmenter`` reporting each stage's seconds into ``stages``."""
        return segmenter.observed_by(lambda stage, seconds: self.stages[stage].append(seconds))

    def stage_medians_ms(self) -> dict[str, float]:
        return {stage: 1000 * statistics.median(values) for stage, values in sorted(self.stages.items())}


def measure_predictions(config: BenchConfig, settings: Settings) -> dict:
    """Throughput in batches, latency one image at a time, re-prompts, decoding and the naive mode's time."""
    load_start = time.perf_counter()
    fast = process_segmenter(settings)
    load_seconds = time.perf_counter() - load_start
    models_gpu_mb = torch.cuda.memory_allocated() / 2**20 if fast.device.type == "cuda" else None
    images = _bench_images(config)
    options = settings.segment_options
    predict = _Predictions(labels_from_names(VOC_LABELS), options, fast.device)
    predict(fast, [images[:1]])  # warm-up: first calls allocate, compile kernels, fill caches, start the CRF pool
    if fast.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    predict.stages.clear()
    batches = [images[i : i + config.batch] for i in range(0, len(images), config.batch)]
    cpu_start = _cpu_seconds(fast)
    throughput_seconds = _timed(lambda: predict(predict.observing(fast), batches))
    cpu_seconds = _cpu_seconds(fast) - cpu_start
    stage_medians = predict.stage_medians_ms()
    latencies = [_timed(lambda image=image: predict(fast, [[image]])) for image in images]
    reprompts = _reprompt_seconds(fast, images, predict.labels, options)
    jpegs = [_jpeg(image) for image in images]
    decodes = [_timed(lambda data=data: decode_image(data, settings.image_limits)) for data in jpegs]
    naive_seconds, naive_cpu_seconds = _naive_seconds(fast, images, predict) if config.naive else (None, None)
    figures = {
        "profile": config.profile,
        "model_version": model_version(settings),
        "device": str(fast.device),
        "dtype": _dtype_name(fast),
        "engine": _engine_name(fast),
        "caption_engine": caption_engine(fast.captioner.model),
        "nouns": settings.nouns,  # "words" where spaCy is not installed (the GPU kit)
        "images": len(images),
        "image_size": list(images[0].shape[1::-1]),  # width, height
        "megapixels": images[0].shape[0] * images[0].shape[1] / 1e6,
        "working_max_side": fast.working_max_side,
        "batch": config.batch,
        "k": options.k,
        "refine": options.refine,
        "crf_processes": fast.refiner.crf_processes,
        "images_per_s": len(images) / throughput_seconds,
        "baseline_images_per_s": None if naive_seconds is None else len(images) / naive_seconds,
        "speedup": None if naive_seconds is None else naive_seconds / throughput_seconds,
        "cpu_ms_per_image": 1000 * cpu_seconds / len(images),  # all threads and CRF processes
        "baseline_cpu_ms_per_image": None if naive_cpu_seconds is None else 1000 * naive_cpu_seconds / len(images),
        "cpu_cores_busy": cpu_seconds / throughput_seconds,
        "baseline_cpu_cores_busy": None if naive_seconds is None else naive_cpu_seconds / naive_seconds,
        "decode_p50_ms": 1000 * _percentile(decodes, 50),  # the images as JPEG files (quality 90)
        **_latency_figures(latencies),
        "reprompt_p50_ms": 1000 * _percentile(reprompts, 50),
        "reprompt_to_cold_ratio": _percentile(reprompts, 50) / max(_percentile(latencies, 50), 1e-9),
        "stages_ms": stage_medians,  # per call: caption and features are called once per batch
        "model_load_s": load_seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "models_gpu_mb": models_gpu_mb,  # all models loaded, before any image
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if fast.device.type == "cuda" else None,
        "hardware": _hardware(fast.device),
        "date": time.strftime("%Y-%m-%d"),
    }
    # after the peak is read: the torch copy of an engine's captioner is the bench's, not a prediction's
    on_engine = caption_engine(fast.captioner.model) != "torch"
    eager = load_captioner_parts(settings) if config.caption_agreement or (config.floors and on_engine) else None
    if config.caption_agreement:
        figures["caption_token_agreement"] = folder_agreement(fast.captioner, eager, config.caption_agreement)
    if config.floors:
        gflops = stage_gflops(fast, eager if on_engine else None, images[0], predict.labels, options)
        peak = gemm_peak_gflops(fast.device)
        figures["floors"] = {"gemm_peak_gflops": peak, "stages": stage_floors(gflops, peak, stage_medians)}
    return figures


def _latency_figures(latencies: Sequence[float]) -> dict[str, float]:
    return {"latency_p50_ms": 1000 * _percentile(latencies, 50), "latency_p95_ms": 1000 * _percentile(latencies, 95)}


def _reprompt_seconds(fast: Segmenter, images: Sequence[np.ndarray], labels: list[Label],
                      options: SegmentOptions) -> list[float]:
    """Each image segmented again from its cached encoding, with another K: what a re-prompt costs."""
    cache = ProcessCache(max_bytes=2**34)
    for index, image in enumerate(images):
        cache.put(str(index), fast.encode(image))
    reprompt_options = SegmentOptions(k=options.k + 1, refine=options.refine, seed=options.seed)
    return [_timed(lambda i=index, image=image: fast.segment(cache.get(str(i)), image, labels, reprompt_options))
            for index, image in enumerate(images)]


def _naive_seconds(fast: Segmenter, images: Sequence[np.ndarray], predict: _Predictions) -> tuple[float, float]:
    """The naive mode's wall and CPU seconds for every image, one at a time."""
    naive = naive_segmenter(fast)
    cpu_start = _cpu_seconds(naive)
    seconds = _timed(lambda: predict(naive, [[image] for image in images]))
    return seconds, _cpu_seconds(naive) - cpu_start


def compare_encoders(config: BenchConfig, settings: Settings) -> dict[str, dict]:
    """One image at a time with each FREESEG_ENCODER of ``config.encoders``, on the same images: latency, each
    stage's median and the peak resident memory, per encoder. Each encoder's models are loaded alone (those of the
    run before released), so its peak is what a process serving with it holds."""
    images = _bench_images(config)
    blocks = {}
    for encoder in config.encoders:
        _release_models()
        blocks[encoder] = _encoder_figures(_bench_settings(config, settings).model_copy(update={"encoder": encoder}),
                                           images)
    _release_models()
    return blocks


def _release_models() -> None:
    process_segmenter.cache_clear()
    gc.collect()


def _encoder_figures(settings: Settings, images: Sequence[np.ndarray]) -> dict:
    segmenter = process_segmenter(settings)
    predict = _Predictions(labels_from_names(VOC_LABELS), settings.segment_options, segmenter.device)
    predict(segmenter, [images[:1]])  # warm-up
    predict.stages.clear()
    observed = predict.observing(segmenter)
    with _PeakMemory() as memory:
        latencies = [_timed(lambda image=image: predict(observed, [[image]])) for image in images]
    return {"model_version": model_version(settings), **_latency_figures(latencies),
            "stages_ms": predict.stage_medians_ms(), "peak_rss_mb": memory.peak_mb}


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _hardware(device: torch.device) -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
    }


def _print(figures: dict) -> None:
    width, height = figures["image_size"]
    print(f"freesegdiff bench: {figures['profile']} on {figures['device']} in {figures['dtype']} "
          f"on the {figures['engine']} engine, "
          f"{figures['images']} images of {width}x{height} ({figures['megapixels']:.2f} MP), "
          f"batch {figures['batch']}, K={figures['k']}, refine={figures['refine']} "
          f"({figures['crf_processes']} CRF processes)")
    naive = (f"(naive {figures['baseline_images_per_s']:.2f}, speedup x{figures['speedup']:.2f})"
             if figures["speedup"] is not None else "(naive mode not run)")
    print(f"  throughput      {figures['images_per_s']:8.2f} images/s   {naive}")
    naive_cpu = (f"; naive {figures['baseline_cpu_ms_per_image']:.1f} ms/image, "
                 f"{figures['baseline_cpu_cores_busy']:.2f} cores busy" if figures["speedup"] is not None else "")
    print(f"  CPU time        {figures['cpu_ms_per_image']:8.1f} ms/image ({figures['cpu_cores_busy']:.2f} cores busy"
          f"{naive_cpu})")
    print(f"  decoding        p50 {figures['decode_p50_ms']:8.1f} ms per JPEG")
    print(f"  latency         p50 {figures['latency_p50_ms']:8.1f} ms   p95 {figures['latency_p95_ms']:.1f} ms")
    print(f"  re-prompt       p50 {figures['reprompt_p50_ms']:8.1f} ms   ({figures['reprompt_to_cold_ratio']:.2f} of a cold prediction)")
    print("  stages (median ms per call): " + ", ".join(f"{k} {v:.1f}" for k, v in figures["stages_ms"].items()))
    gpu = (f", GPU {figures['models_gpu_mb']:.0f} MB with the models loaded, peak {figures['peak_gpu_mb']:.0f} MB"
           if figures["peak_gpu_mb"] is not None else "")
    if "caption_token_agreement" in figures:
        agreement = figures["caption_token_agreement"]
        print(f"  caption tokens  {agreement['same']} of {agreement['images']} photos as torch eager's on "
              f"{agreement['engine']}; median per caption: " +
              ", ".join(f"{name} {ms:.0f} ms" for name, ms in agreement["caption_ms"].items()))
    if "floors" in figures:
        floors = figures["floors"]
        print(f"  floors          float32 GEMM peak {floors['gemm_peak_gflops']:.0f} GFLOP/s; per stage GFLOP, floor, "
              "measured/floor: " + ", ".join(
                  f"{stage} {row['gflop']:.1f} / {1000 * row['floor_s']:.0f} ms / "
                  + ("-" if row["times_floor"] is None else f"x{row['times_floor']:.1f}")
                  for stage, row in floors["stages"].items()))
    print(f"  memory          RSS peak {figures['peak_rss_mb']:.0f} MB{gpu}; models loaded in {figures['model_load_s']:.1f} s")
    for encoder, block in figures.get("encoders", {}).items():
        print(f"  encoder {encoder:7} p50 {block['latency_p50_ms']:8.1f} ms   features "
              f"{block['stages_ms'].get('features', 0.0):.1f} ms   RSS peak {block['peak_rss_mb']:.0f} MB"
              f"   ({block['model_version']})")
