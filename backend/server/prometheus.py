"""Prometheus metrics of the server, in one registry per app (tests build several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from backend.server.inference import ModelState

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("freeseg_requests", "HTTP requests by endpoint", ["endpoint"], registry=self.registry)
        self.errors = Counter("freeseg_errors", "Errors by kind", ["kind"], registry=self.registry)
        self.tasks = Counter("freeseg_tasks", "Tasks predicted, by outcome", ["outcome"], registry=self.registry)
        self.queue_depth = Gauge("freeseg_queue_depth", "Inference jobs waiting or running", registry=self.registry)
        self.model_state = Gauge("freeseg_model_state", "1 for the current model state", ["state"], registry=self.registry)
        self.stage_seconds = Histogram(
            "freeseg_stage_seconds", "Time of each pipeline stage", ["stage"], buckets=STAGE_BUCKETS,
            registry=self.registry,
        )

        self.cache_hits = Counter("freeseg_feature_cache_hits", "Encodings found in the cache", registry=self.registry)
        self.cache_misses = Counter("freeseg_feature_cache_misses", "Encodings not in the cache", registry=self.registry)
        self.cache_errors = Counter("freeseg_feature_cache_errors", "Cache calls that failed or were skipped",
                                    registry=self.registry)
        self.cache_skipped_writes = Counter("freeseg_feature_cache_skipped_writes",
                                            "Encodings not cached because the writer was busy", registry=self.registry)
        self.cache_held_bytes = Gauge("freeseg_feature_cache_held_bytes",
                                      "Bytes the in-process feature cache holds now", registry=self.registry)
        self.cache_written_bytes = Counter("freeseg_feature_cache_written_bytes",
                                           "Bytes this process has written to the Redis feature cache",
                                           registry=self.registry)

        self.feedback_iou = Histogram("freeseg_feedback_iou", "IoU of predicted and corrected masks, per label",
                                      ["label"], buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0),
                                      registry=self.registry)
        self.feedback_regions = Counter("freeseg_feedback_regions", "Predicted regions kept, edited or deleted, "
                                        "and regions added, per label", ["label", "outcome"], registry=self.registry)

        self.background_runs = Gauge("freeseg_background_runs", "Background runs queued or running (GET /jobs)",
                                     registry=self.registry)
        self.background_tasks_left = Gauge("freeseg_background_tasks_left",
                                           "Tasks of the background runs without an outcome yet", registry=self.registry)

        self.learning_events = Counter("freeseg_learning_events", "Learning from annotations (learn, forget, "
                                       "rebuild) by outcome", ["action", "outcome"], registry=self.registry)

    def cache_metrics(self) -> CacheMetricsAdapter:
        return CacheMetricsAdapter(self)

    def set_model_state(self, state: ModelState) -> None:
        for known in ModelState:
            self.model_state.labels(state=known.value).set(1 if known == state else 0)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage=stage).observe(seconds)


class CacheMetricsAdapter:
    """The cache's reports (``backend.storage.feature_cache.CacheMetrics``) as Prometheus metrics."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def hit(self) -> None:
        self.metrics.cache_hits.inc()

    def miss(self) -> None:
        self.metrics.cache_misses.inc()

    def error(self) -> None:
        self.metrics.cache_errors.inc()

    def held(self, total_bytes: int) -> None:
        self.metrics.cache_held_bytes.set(total_bytes)

    def written(self, value_bytes: int) -> None:
        self.metrics.cache_written_bytes.inc(value_bytes)
