"""How a run shows itself: a progress bar while it works, a summary when it is over."""

from __future__ import annotations

import sys

from tqdm import tqdm

from backend.storage.job_ledger import RunProgress


class RunBar:
    """A tqdm bar on stderr: items settled of total, items per second and time left, the counts after it."""

    def __init__(self, total: int, description: str, enabled: bool = True, unit: str = "task") -> None:
        self.bar = tqdm(total=total, desc=description, unit=unit, file=sys.stderr, disable=not enabled or total < 2)

    def __enter__(self) -> RunBar:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.bar.close()

    def show(self, progress: RunProgress) -> None:
        self.bar.set_postfix_str(f"done {progress.done}, skipped {progress.skipped}, failed {progress.failed}",
                                 refresh=False)
        self.bar.update(progress.settled - self.bar.n)


def summary(title: str, progress: RunProgress, unit: str = "tasks", item: str = "task ",
            max_failures: int | None = None) -> str:
    """``title: N tasks: D done, S skipped, F failed in T s (R tasks/s)``, then one line per failure."""
    lines = [(f"{title}: {progress.total} {unit}: {progress.done} done, {progress.skipped} skipped, "
              f"{progress.failed} failed in {progress.seconds:.1f} s ({progress.per_second:.2f} {unit}/s)")]
    if not progress.complete:
        lines.append(f"  {progress.total - progress.settled} {unit} have no outcome yet")
    shown = progress.failures[:max_failures]
    lines += [f"  failed {item}{name}: {reason}" for name, reason in shown]
    if len(shown) < len(progress.failures):
        lines.append(f"  ... and {len(progress.failures) - len(shown)} more failures")
    return "\n".join(lines)
