import os

import pytest
import torch

from qkv.bench import memory


def _pid(_=None) -> int:
    return os.getpid()


def test_a_reset_peak_then_reads_the_growth_of_one_allocation():
    if not memory.reset_peak():
        pytest.skip("this system does not let a process reset its high-water mark")
    memory.return_freed_memory()
    base = memory.peak_resident_bytes()
    assert abs(base - memory.resident_bytes()) < 64 << 20  # the mark starts at the resident size
    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    grown = memory.peak_resident_bytes() - base
    del block
    assert 60 << 20 <= grown <= 80 << 20
    assert memory.peak_resident_bytes() - base > 60 << 20  # a mark: it stays after the free


def test_fresh_processes_run_each_task_in_a_process_of_its_own():
    with memory.fresh_processes(["qkv.bench.memory"]) as pool:
        pids = [pool.submit(_pid).result() for _ in range(2)]
    assert os.getpid() not in pids and pids[0] != pids[1]
