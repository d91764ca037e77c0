"""The CPU sweep behind `qkv bench`: the table's arithmetic and the memory guard (the command
itself is tested in tests/cli/test_bench_cli.py)."""

from qkv.bench import cpu


def test_ratios_and_causal_speedups():
    rows = [
        {"n": 64, "mode": "fwd", "causal": c, "backend": b, "seconds": s, "peak_bytes": 10,
         "score_matrix_bytes": 1000, "tflops": 1.0}
        for b, c, s in (("sdpa", False, 2.0), ("chunked", False, 3.0), ("chunked", True, 1.5),
                        ("sdpa", True, 1.0))
    ]
    rows.append({"n": 64, "mode": "fwd", "causal": False, "backend": "reference",
                 "skipped": "too big"})
    rows = cpu.add_ratios(rows)
    assert rows[1]["time_vs_sdpa"] == 1.5
    assert cpu.causal_speedups(rows)[("chunked", 64, "fwd")] == 2.0
    table = cpu.markdown_table(rows)
    assert "1.50×" in table and "skipped: too big" in table and "1.00%" in table


def test_reference_memory_guard():
    small = cpu.CpuCase(n=1024, backend="reference")
    big = cpu.CpuCase(n=16384, backend="reference", mode="fwd_bwd")
    assert cpu.reference_fits(small, 12e9) and not cpu.reference_fits(big, 12e9)


def test_cases_larger_than_the_machine_are_skipped_with_a_readable_size():
    huge = cpu.CpuCase(n=50_000_000, backend="sdpa", mode="fwd_bwd")
    assert cpu.skip_reason(huge, 12e9, 64e9) == (
        "needs > 819 GB for q, k, v and outputs (64 GB available)")
    assert cpu.skip_reason(cpu.CpuCase(n=1024, backend="chunked"), 12e9, 64e9) is None
    reference = cpu.CpuCase(n=200_000, backend="reference")
    assert cpu.skip_reason(reference, 12e9, 64e9) == "needs > 1.28 TB per n x n matrix"
