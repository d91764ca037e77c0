"""The triton kernels compile for sm_90 and sm_80 without a GPU (the quick subset of
benchmarks/triton_compile_check.py: every kernel, its first config, plain, D = 64, fp16).

The suite runs triton in its interpreter (tests/conftest.py), whose kernels cannot be compiled,
so the compiles run in a child process without TRITON_INTERPRET, one at a time (14 compiles,
about 15-25 s on 2 cores).
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_CHILD = """
import json, sys
from qkv.attention.triton import compile_check as cc
todo = [(c, a) for c in cc.quick_cases() for a in cc.TARGETS]
json.dump([r.as_dict() for r in cc.compile_many(todo, workers=1)], open(sys.argv[1], "w"))
"""


def _ptxas() -> bool:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "from qkv.attention.triton import compile_check as cc; print(cc.ptxas_available())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=False)
    return out.stdout.strip() == "True"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not _ptxas():
        pytest.skip("the triton wheel's ptxas is missing")
    path = tmp_path_factory.mktemp("compile") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(path.read_text())


def test_every_kernel_compiles_for_sm90_and_sm80(results, record_property):
    from qkv.attention.triton import compile_check as cc

    assert {(r["kernel"], r["arch"]) for r in results} == {
        (k, a) for k in cc.KERNELS for a in cc.TARGETS}
    failed = [(r["kernel"], r["arch"], r["error"]) for r in results if not r["compiled"]]
    assert not failed
    lines = []
    for r in sorted(results, key=lambda r: (cc.KERNELS.index(r["kernel"]), -r["arch"])):
        assert 0 < r["regs"] <= 255, r
        assert r["spill"] is not None and r["spill"] >= 0, r
        assert r["fits"], r  # shared memory within the target's per-block limit
        lines.append(f"{r['kernel']} {r['config']} sm_{r['arch']}: {r['regs']} regs, "
                     f"{r['spill']} B spilled, {r['shared']} B shared")
    record_property("compile_figures", "; ".join(lines))
    print("\n" + "\n".join(lines))  # shown with pytest -s / -rP


def test_decode_split_cases_follow_its_launch_config():
    """The compile check compiles decode split in the config decode_forward launches: fp32 and
    wide heads get their own (spill-free on sm_90 and sm_80, RESULTS.md)."""
    from qkv.attention.triton import compile_check as cc
    from qkv.attention.triton import kernels_decode
    for case in cc.cases(kernels=("decode_split",)):
        want = kernels_decode.split_config(case.dtype == "fp32", case.head_dim)
        assert (case.block_n, case.num_warps, case.num_stages) == want
    assert kernels_decode.split_config(True, 128) != kernels_decode.split_config(False, 128)
