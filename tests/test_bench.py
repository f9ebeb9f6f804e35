"""The benchmark command runs and reports what it promises (figures are read by people, not asserted)."""

import json

import numpy as np

from backend import bench
from backend.bench import BenchConfig, PerClusterRefiner, run_bench, synthetic_images
from backend.pipeline.refine import refine_masks


def test_synthetic_images_are_deterministic_photo_sized():
    first, again = synthetic_images(2, seed=3), synthetic_images(2, seed=3)
    assert first[0].shape == (375, 500, 3) and first[0].dtype.name == "uint8"
    assert all((a == b).all() for a, b in zip(first, again)) and not (first[0] == first[1]).all()


def test_bench_reports_every_figure(tiny_settings, tmp_path, capsys):
    config = BenchConfig(profile="tiny", device="cpu", images=2, batch=2, json_path=tmp_path / "bench.json")
    figures = run_bench(config, tiny_settings)
    saved = json.loads((tmp_path / "bench.json").read_text())
    for key in ("images_per_s", "baseline_images_per_s", "speedup", "latency_p50_ms", "latency_p95_ms",
                "reprompt_p50_ms", "stages_ms", "hardware", "peak_rss_mb", "models_gpu_mb", "crf_processes",
                "cpu_ms_per_image", "baseline_cpu_ms_per_image", "cpu_cores_busy", "baseline_cpu_cores_busy"):
        assert key in saved, key
    assert saved["images_per_s"] > 0 and saved["baseline_images_per_s"] > 0
    assert saved["cpu_ms_per_image"] > 0 and saved["baseline_cpu_ms_per_image"] > 0
    assert set(saved["stages_ms"]) >= {"caption", "features", "candidates", "clustering", "labelling", "refine", "results"}
    assert saved["model_version"].endswith("tiny-random-weights")
    assert figures["speedup"] == saved["speedup"]
    assert "speedup" in capsys.readouterr().out


def test_the_naive_refiner_runs_a_fresh_crf_per_cluster_with_the_same_masks(monkeypatch):
    image = synthetic_images(1)[0][:120, :160]
    masks = np.zeros((3, 120, 160), dtype=bool)
    masks[0, 10:60, 20:90], masks[1, 40:110, 60:150], masks[2] = True, True, True
    calls = []
    monkeypatch.setattr(bench, "refine_masks", lambda *args: (calls.append(len(args[1])), refine_masks(*args))[1])
    refined = PerClusterRefiner().start(image, masks, "crf")()
    assert np.array_equal(refined, refine_masks(image, masks, "crf"))
    assert calls == [1, 1, 1, 3]  # one CRF per cluster, then the overlap rule over all three
