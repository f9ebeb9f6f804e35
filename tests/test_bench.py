"""The benchmark command runs and reports what it promises (figures are read by people, not asserted)."""

import json

import numpy as np
import pytest

from backend.benchmark import bench
from backend.benchmark.bench import BenchConfig, PerClusterRefiner, run_bench, synthetic_images
from backend.pipeline.refine import refine_masks


def test_synthetic_images_are_deterministic_photo_sized():
    first, again = synthetic_images(2, seed=3), synthetic_images(2, seed=3)
    assert first[0].shape == (375, 500, 3) and first[0].dtype.name == "uint8"
    assert all((a == b).all() for a, b in zip(first, again)) and not (first[0] == first[1]).all()


@pytest.mark.slow
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


def test_cluster_agreement_matches_clusters_one_to_one():
    first = np.array([[0, 0, 1, 1], [2, 2, 3, 3]])
    renamed = np.array([3, 2, 1, 0])[first]
    assert bench.cluster_agreement(first, renamed) == 1.0
    changed = renamed.copy()
    changed[0, 0] = 0  # one pixel of eight moved to another cluster
    assert bench.cluster_agreement(first, changed) == 7 / 8


@pytest.mark.slow
def test_bfloat16_cluster_maps_agree_with_float32_ones(tiny_settings, tmp_path):
    """The dtype check of docs/benchmarks.md, on the tiny profile: it runs both dtypes side by side."""
    config = BenchConfig(profile="tiny", device="cpu", images=3, batch=1, dtype="bfloat16", compare_dtype="float32",
                         json_path=tmp_path / "dtypes.json")
    figures = run_bench(config, tiny_settings)
    [variant] = figures["variants"]
    assert figures["reference"]["dtype"] == "float32" and figures["reference"]["features_ms"] > 0
    assert (variant["dtype"], variant["engine"]) == ("bfloat16", "torch") and variant["features_ms"] > 0
    assert variant["cluster_agreement_min"] >= 0.95
    assert json.loads((tmp_path / "dtypes.json").read_text())["variants"] == figures["variants"]


@pytest.mark.slow
def test_bench_at_an_image_size_without_the_naive_mode(tiny_settings, tmp_path):
    config = BenchConfig(profile="tiny", device="cpu", images=1, batch=1, image_size=(900, 600), naive=False,
                         dtype="float32", json_path=tmp_path / "big.json")
    figures = run_bench(config, tiny_settings)
    assert figures["image_size"] == [900, 600] and figures["megapixels"] == 0.54
    assert figures["dtype"] == "float32" and figures["speedup"] is None and figures["decode_p50_ms"] > 0


@pytest.mark.slow
def test_bench_compares_image_sizes_side_by_side(tiny_settings, tmp_path):
    config = BenchConfig(profile="tiny", device="cpu", images=1, batch=1, compare_sizes=((320, 240), (1200, 800)),
                         json_path=tmp_path / "sizes.json")
    figures = run_bench(config, tiny_settings)
    assert set(figures["sizes"]) == {"320x240", "1200x800"}
    big = figures["sizes"]["1200x800"]
    assert big["megapixels"] == 0.96 and big["latency_p50_ms"] > 0 and big["peak_rss_mb"] > 0
    assert figures["sizes"]["320x240"]["latency_ratio"] == 1.0
    assert json.loads((tmp_path / "sizes.json").read_text())["sizes"]["1200x800"]["cpu_ratio"] == big["cpu_ratio"]


@pytest.mark.slow
def test_bench_times_each_encoder_side_by_side(tiny_settings, tmp_path, capsys):
    config = BenchConfig(profile="tiny", device="cpu", images=2, batch=1, naive=False, encoders=("vae", "taesd"),
                         json_path=tmp_path / "encoders.json")
    figures = run_bench(config, tiny_settings)
    blocks = json.loads((tmp_path / "encoders.json").read_text())["encoders"]
    assert set(blocks) == {"vae", "taesd"} and blocks == figures["encoders"]
    for block in blocks.values():
        assert block["latency_p50_ms"] > 0 and block["peak_rss_mb"] > 0 and block["stages_ms"]["features"] > 0
    assert blocks["taesd"]["model_version"].endswith("-taesd-tiny-random-weights")
    assert blocks["vae"]["model_version"] == figures["model_version"]  # the settings' own encoder: the VAE
    assert "encoder taesd" in capsys.readouterr().out


def test_the_gemm_peak_is_a_positive_speed():
    from backend.benchmark.floors import gemm_peak_gflops

    assert gemm_peak_gflops(size=128, repeats=3) > 0


@pytest.mark.slow
def test_each_stages_floor_is_its_gflop_over_the_gemm_peak(tiny_settings, tmp_path, capsys):
    config = BenchConfig(profile="tiny", device="cpu", images=1, batch=1, naive=False, json_path=tmp_path / "b.json")
    run_bench(config, tiny_settings)
    floors = json.loads((tmp_path / "b.json").read_text())["floors"]
    peak, stages = floors["gemm_peak_gflops"], floors["stages"]
    assert peak > 0 and {"features", "caption", "labelling"} <= set(stages)
    for row in stages.values():
        assert row["gflop"] > 0 and row["floor_s"] == pytest.approx(row["gflop"] / peak)
        assert row["times_floor"] > 0
    assert "GEMM peak" in capsys.readouterr().out
