"""Property test: random shapes and keywords; each backend that supports the call vs reference."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ._support import (
    SIZE_CAPS,
    Case,
    assert_matches,
    best_dtype,
    make_inputs,
    reference_run,
    run,
)


@st.composite
def cases(draw):
    Hk = draw(st.integers(1, 2))
    Lq, Lk = draw(st.integers(0, 40)), draw(st.integers(0, 50))
    B = draw(st.integers(1, 2))
    kw = {}
    if draw(st.booleans()):
        kw["causal"] = True
    if draw(st.booleans()):
        side = st.one_of(st.none(), st.integers(0, 20))
        kw["window"] = (draw(side), draw(side))
    if draw(st.booleans()):
        kw["softcap"] = draw(st.floats(0.5, 10.0))
    if draw(st.booleans()):
        kw["scale"] = draw(st.floats(0.05, 1.0))
    if draw(st.integers(0, 3)) == 0:
        kw["dropout_p"] = draw(st.sampled_from([0.1, 0.5]))
    shapes = st.sampled_from([None, "full", "keys", "2d", "rows"])
    lengths = st.none() | st.tuples(*[st.integers(0, Lk)] * B)
    return Case(
        id=f"prop{draw(st.integers(0, 2**16))}",
        B=B, Hk=Hk, Hq=Hk * draw(st.integers(1, 3)), Lq=Lq, Lk=Lk,
        D=draw(st.sampled_from([8, 16, 24, 40])), Dv=draw(st.sampled_from([8, 16, 24])),
        mask=draw(shapes), bias=draw(shapes), alibi=draw(st.sampled_from([None, "h", "bh"])),
        kv_lengths=draw(lengths), kw=kw,
    )


def _under_cap(name: str, c: Case) -> bool:
    cap = SIZE_CAPS.get(name)
    return cap is None or (max(c.Lq, c.Lk) <= cap["max_len"] and max(c.D, c.Dv) <= cap["max_dim"])


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases(), with_lse=st.booleans())
def test_backend_matches_reference(backend, case, with_lse):
    if backend == "reference" or not _under_cap(backend, case):
        return
    dtype = best_dtype(backend)
    inputs, kw = make_inputs(case)
    try:
        got = run(backend, inputs, kw, dtype, with_lse=with_lse)
    except pytest.skip.Exception:  # a legitimate refusal, already checked by `run`
        assert backend != "chunked", "chunked supports every call"
        return
    ref = reference_run(inputs, kw, dtype, with_lse=with_lse)
    assert_matches(got, ref, dtype, label=f"{backend}: ")
