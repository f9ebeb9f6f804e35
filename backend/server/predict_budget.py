"""Whether a /predict fits its budget: Label Studio waits 100 s for the answer, then throws it away.

The estimate is the request's tasks times the measured seconds per image: an exponentially
weighted mean of the requests answered and the background batches run, which starts, before
any measurement, from a conservative prior for the device (full-size models on a 2-core CPU
take about 30 s an image). A request of one task, or with an interactive context (a click, a
typed prompt), is never too big: an annotator is waiting for it.
"""

from __future__ import annotations

import threading

PRIOR_SECONDS_PER_IMAGE = {"cpu": 30.0, "cuda": 2.0}  # full-size models, before any measurement, by device type
TINY_PRIOR_SECONDS_PER_IMAGE = 2.0  # the tiny profile's small models (tests, smoke runs): full-size CRF dominates
WEIGHT = 0.3  # of the newest measurement in the mean


class PredictBudget:
    """FREESEG_PREDICT_BUDGET_SECONDS against the measured seconds per image of this process's models."""

    def __init__(self, budget_seconds: float, device_type: str, tiny_models: bool = False) -> None:
        self.budget_seconds = budget_seconds
        self.seconds_per_image = (TINY_PRIOR_SECONDS_PER_IMAGE if tiny_models else
                                  PRIOR_SECONDS_PER_IMAGE.get(device_type, PRIOR_SECONDS_PER_IMAGE["cpu"]))
        self.measured = False
        self._lock = threading.Lock()

    def observe(self, images: int, seconds: float) -> None:
        """``images`` took ``seconds``: the first measurement replaces the prior, later ones are weighed in."""
        if images <= 0:
            return
        with self._lock:
            latest = seconds / images
            self.seconds_per_image = (latest if not self.measured
                                      else (1 - WEIGHT) * self.seconds_per_image + WEIGHT * latest)
            self.measured = True

    def estimate(self, tasks: int) -> float:
        return tasks * self.seconds_per_image

    def too_big(self, tasks: int, interactive: bool) -> bool:
        """Whether a request of ``tasks`` should go to the background rather than be answered now."""
        return tasks > 1 and not interactive and self.estimate(tasks) > self.budget_seconds
