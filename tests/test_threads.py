"""The CPU thread plan: cores from affinity and the cgroup quota, split between torch and the CRF processes."""

from __future__ import annotations

import os

import pytest
import torch

from backend import threads
from backend.settings import Settings
from backend.threads import ThreadPlan, available_cores, configure_threads, plan_threads


@pytest.fixture
def eight_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))


def test_a_cgroup_v2_quota_caps_the_cores(tmp_path, eight_cores):
    (tmp_path / "cpu.max").write_text("250000 100000\n")  # 2.5 CPUs
    assert available_cores(tmp_path) == 2
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a CPU still runs one thread
    assert available_cores(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cores(tmp_path) == 8


def test_a_cgroup_v1_quota_caps_the_cores(tmp_path, eight_cores):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    assert available_cores(tmp_path) == 4
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert available_cores(tmp_path) == 8


def test_without_a_cgroup_file_the_affinity_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5, 7})
    assert available_cores(tmp_path / "missing") == 3
    (tmp_path / "cpu.max").write_text("garbage")
    assert available_cores(tmp_path) == 3


@pytest.mark.parametrize(
    "cores, device, crf_setting, torch_setting, expected",
    [
        (2, "cpu", None, None, ThreadPlan(2, 2, 1)),  # on the CPU torch gets every core
        (16, "cpu", None, None, ThreadPlan(16, 16, 8)),
        (1, "cpu", None, None, ThreadPlan(1, 1, 1)),
        (16, "cuda", None, None, ThreadPlan(16, 1, 15)),
        (16, "cpu", 0, None, ThreadPlan(16, 16, 0)),  # the CRF in line
        (4, "cpu", 3, None, ThreadPlan(4, 4, 3)),
        (8, "cpu", None, 2, ThreadPlan(8, 2, 4)),  # OMP_NUM_THREADS=2, as for four workers on eight cores
        (8, "cuda", 2, 3, ThreadPlan(8, 3, 2)),
    ],
)
def test_torch_threads_and_crf_processes_come_from_the_cores(cores, device, crf_setting, torch_setting, expected):
    plan = plan_threads(cores, device, crf_setting, torch_setting)
    assert plan == expected
    if crf_setting is None and torch_setting is None:
        assert plan.torch_threads <= cores and plan.crf_processes <= cores


def test_configure_threads_sets_torch_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(threads, "available_cores", lambda: 6)
    before = torch.get_num_threads()
    try:
        with caplog.at_level("INFO", logger="backend.threads"):
            plan = configure_threads("cpu", None)
        assert plan == ThreadPlan(6, 6, 3) and torch.get_num_threads() == 6
        assert "6 cores available; torch 6 threads (OMP_NUM_THREADS), 3 CRF processes" in caplog.text
        configure_threads("cpu", None, torch_threads=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_omp_num_threads_is_the_torch_threads_setting(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert Settings().torch_threads == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert Settings().torch_threads is None
