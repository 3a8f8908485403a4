"""The cores a process may use: a container's CPU quota caps the affinity mask it sees."""

import os

import pytest

from elmforest.utils import threads


@pytest.fixture
def cgroup(tmp_path, monkeypatch):
    monkeypatch.setattr(threads, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    return tmp_path


def test_v2_quota_caps_the_mask(cgroup):
    (cgroup / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_cpu_quota() == 2  # 1.5 CPUs' time: rounded up
    assert threads.cpu_cores() == 2


def test_unlimited_or_unreadable_leaves_the_mask(cgroup):
    assert threads.cgroup_cpu_quota() is None  # no cgroup files at all
    assert threads.cpu_cores() == 64
    (cgroup / "cpu.max").write_text("max 100000\n")
    assert threads.cpu_cores() == 64
    (cgroup / "cpu.max").write_text("garbage\n")
    assert threads.cpu_cores() == 64


def test_v1_quota(cgroup):
    (cgroup / "cpu").mkdir()
    (cgroup / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (cgroup / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    assert threads.cpu_cores() == 4
    (cgroup / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.cpu_cores() == 64


def test_a_quota_above_the_mask_leaves_the_mask(cgroup, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    (cgroup / "cpu.max").write_text("800000 100000\n")
    assert threads.cpu_cores() == 2


def test_omp_threads_set_to_the_quota_unless_given(cgroup, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads.threads_within_quota()
    assert "OMP_NUM_THREADS" not in os.environ  # no quota: torch's own default stands
    (cgroup / "cpu.max").write_text("200000 100000\n")
    threads.threads_within_quota()
    assert os.environ["OMP_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the user's choice wins
    threads.threads_within_quota()
    assert os.environ["OMP_NUM_THREADS"] == "7"
