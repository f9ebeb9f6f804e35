"""Prometheus metrics of the server, in one registry per app (tests build several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGES = ("caption", "features", "candidates", "clustering", "labelling", "refine", "results")
MODEL_STATES = ("loading", "ready", "failed")
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

    def set_model_state(self, state: str) -> None:
        for known in MODEL_STATES:
            self.model_state.labels(state=known).set(1 if known == state else 0)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage=stage).observe(seconds)
