"""A memory people can see: ``freesegdiff learn --show`` and the summary ``GET /memory/{project}`` serves."""

from __future__ import annotations

import numpy as np
import pytest

from backend.cli import main
from backend.storage.backing import project_memories
from backend.storage.memory_summary import MemorySummary
from backend.models.identity import model_version, settings_fingerprint
from backend.pipeline.memory import UNLABELED, LabelExamples, Memory, MemoryBounds, Source

BOUNDS = MemoryBounds(label_bytes=1 << 20, project_bytes=1 << 22)


def examples(regions: int, cells: int, channels: int = 8) -> LabelExamples:
    return LabelExamples(np.ones((regions, channels), np.float16), np.ones((cells, channels), np.float16))


def taught_memory(fingerprint: str = "fp") -> Memory:
    memory = Memory(fingerprint, 8, BOUNDS)
    memory.learn("100", {"rust": examples(2, 5), UNLABELED: examples(1, 3)}, Source("10", "2026-12-01T10:00:00+00:00"))
    memory.learn("101", {"rust": examples(1, 4), "lesion": examples(1, 2)}, Source("11", None))
    memory.forget("102", deleted=True)
    return memory


def test_the_summary_counts_regions_cells_bytes_and_names_the_annotations():
    memory = taught_memory()
    summary = MemorySummary.of("7", memory, "freesegdiff-0.1.0-abc")
    by_label = {item.label: item for item in summary.labels}
    assert list(by_label) == ["rust", UNLABELED, "lesion"]  # in the order first taught
    assert (by_label["rust"].regions, by_label["rust"].cells, by_label["rust"].annotations) == (3, 9, ["100", "101"])
    assert by_label["rust"].bytes == (3 + 9) * 8 * 2  # float16 vectors of 8 channels
    assert sum(item.bytes for item in summary.labels) == summary.bytes == memory.nbytes
    assert [(a.annotation, a.task, a.updated_at) for a in summary.annotations] == [
        ("100", "10", "2026-12-01T10:00:00+00:00"), ("101", "11", None)]
    assert summary.revision == memory.revision and summary.model_version == f"freesegdiff-0.1.0-abc-m{memory.revision}"
    assert summary.deleted_annotations == 1
    text = summary.format()
    assert "(unlabeled)" in text and "lesion" in text and "100, 101" in text and f"revision {memory.revision}" in text


def test_freesegdiff_learn_show_prints_the_memory_without_loading_models(tmp_path, monkeypatch, capsys):
    from backend.settings import get_settings

    for name, value in (("FREESEG_MODELS", "tiny"), ("FREESEG_DEVICE", "cpu"), ("MODEL_DIR", str(tmp_path))):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setattr("backend.cli.process_segmenter", lambda *args: pytest.fail("--show loaded the models"))
    get_settings.cache_clear()
    try:
        settings = get_settings()
        assert main(["learn", "--project", "7", "--show"]) == 1
        assert "no memory" in capsys.readouterr().out
        fingerprint = settings_fingerprint(settings)
        project_memories(settings).change("7", fingerprint, 8,
                                                       lambda memory: memory.replace(taught_memory(fingerprint)))
        assert main(["learn", "--project", "7", "--show"]) == 0
        out = capsys.readouterr().out
        revision = project_memories(settings).load("7", fingerprint).revision
        assert f"model_version {model_version(settings)}-m{revision}" in out
        rust = next(line for line in out.splitlines() if line.startswith("rust"))
        assert rust.split() == ["rust", "3", "9", str(12 * 16), "100,", "101"]
    finally:
        get_settings.cache_clear()
