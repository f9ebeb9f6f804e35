"""The CPU thread plan: cores from affinity and the cgroup quota, split between torch and the CRF processes."""

from __future__ import annotations

import os

import pytest
import torch

from backend import threads
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
    "cores, device, setting, expected",
    [
        (2, "cpu", None, ThreadPlan(2, 1, 1)),
        (16, "cpu", None, ThreadPlan(16, 8, 8)),
        (1, "cpu", None, ThreadPlan(1, 1, 1)),
        (16, "cuda", None, ThreadPlan(16, 1, 15)),
        (16, "cpu", 0, ThreadPlan(16, 16, 0)),  # the CRF in line: torch gets every core
        (4, "cpu", 3, ThreadPlan(4, 1, 3)),
    ],
)
def test_torch_threads_and_crf_processes_share_the_cores(cores, device, setting, expected):
    plan = plan_threads(cores, device, setting)
    assert plan == expected
    assert plan.torch_threads + plan.crf_processes <= max(cores, plan.crf_processes + 1)


def test_configure_threads_sets_torch_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(threads, "available_cores", lambda: 6)
    before = torch.get_num_threads()
    try:
        with caplog.at_level("INFO", logger="backend.threads"):
            plan = configure_threads("cpu", None)
        assert plan == ThreadPlan(6, 3, 3) and torch.get_num_threads() == 3
        assert "6 cores available; torch 3 threads, 3 CRF processes" in caplog.text
    finally:
        torch.set_num_threads(before)
