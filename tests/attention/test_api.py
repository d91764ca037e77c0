"""The registry, `qkv.backends`, `qkv.attention_weights` and the `auto` policy."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.attention.registry import Backend, choose, get, register
from qkv.attention.spec import check_call

from ._support import BACKENDS, assert_close, registry


def test_backends_on_cpu():
    cpu = qkv.backends("cpu")
    assert {"reference", "chunked", "sdpa"} <= set(cpu)
    assert len(cpu) == len(set(cpu))
    assert set(cpu) <= set(registry._REGISTRY)
    assert qkv.backends(torch.device("cpu")) == cpu
    if not torch.cuda.is_available():
        assert qkv.backends() == cpu
    # On the CPU the fused torch kernel is preferred where it applies, the reference last of
    # the built-in three.
    assert cpu.index("sdpa") < cpu.index("chunked") < cpu.index("reference")


def _isolated_registry(monkeypatch):
    """Registrations made by the test are undone after it."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "AUTO_ORDER",
                        {k: list(v) for k, v in registry.AUTO_ORDER.items()})


def test_registering_a_backend_adds_it_to_the_device_list(monkeypatch):
    _isolated_registry(monkeypatch)
    register(Backend("fake", get("reference").forward, device_types=("cpu",)))
    assert "fake" in qkv.backends("cpu")
    assert "fake" not in registry._ordered(torch.device("cuda"))  # a type it did not declare
    q = torch.randn(1, 1, 3, 4)
    out = qkv.attention(q, q, q, backend="fake")
    torch.testing.assert_close(out, qkv.attention(q, q, q, backend="reference"))


def _weights_inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 8, dtype=torch.float64, generator=g)
    k = torch.randn(2, 2, 13, 8, dtype=torch.float64, generator=g)
    v = torch.randn(2, 2, 13, 5, dtype=torch.float64, generator=g)
    return q, k, v


@pytest.mark.parametrize("kw", [
    {},
    {"causal": True, "window": (3, None)},
    {"kv_lengths": torch.tensor([0, 6]), "alibi_slopes": torch.ones(4), "softcap": 2.0},
    {"mask": torch.rand(9, 13, generator=torch.Generator().manual_seed(1)) < 0.5,
     "bias": torch.randn(13, dtype=torch.float64), "scale": 0.2},
], ids=["plain", "causal_window", "lengths_alibi_softcap", "mask_bias_scale"])
def test_attention_weights(kw):
    q, k, v = _weights_inputs()
    w = qkv.attention_weights(q, k, **kw)
    assert w.shape == (2, 4, 9, 13) and w.dtype == q.dtype
    sums = w.sum(-1)
    assert torch.all((sums - 1).abs() < 1e-12) or torch.all(
        ((sums - 1).abs() < 1e-12) | (sums == 0))
    assert (w >= 0).all()
    # The weights blend v into exactly what attention returns.
    out = qkv.attention(q, k, v, backend="reference", **kw)
    torch.testing.assert_close(w @ v.repeat_interleave(2, dim=1), out)


def test_attention_weights_of_empty_rows_are_zero():
    q, k, _ = _weights_inputs()
    w = qkv.attention_weights(q, k, kv_lengths=torch.tensor([0, 13]))
    assert (w[0] == 0).all()
    torch.testing.assert_close(w[1].sum(-1), torch.ones(4, 9, dtype=torch.float64))


# Calls that some CPU backend supports; auto must run each of them, and match the reference.
AUTO_CALLS = {
    "plain_fp32": ({}, torch.float32),
    "plain_fp64": ({}, torch.float64),
    "causal_fp16": ({"causal": True}, torch.float16),
    "softcap_dropout": ({"softcap": 2.0, "dropout_p": 0.2}, torch.float32),
    "lse_window": ({"return_lse": True, "window": (2, 2)}, torch.bfloat16),
    "mask_bias_alibi": ({"mask": "mask", "bias": "bias", "alibi_slopes": "alibi"}, torch.float32),
    "kv_lengths_fp64_lse": ({"kv_lengths": "lengths", "return_lse": True}, torch.float64),
}


def _auto_inputs(kw, dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 11, 16, generator=g).to(dtype)
    k = torch.randn(2, 2, 19, 16, generator=g).to(dtype)
    v = torch.randn(2, 2, 19, 16, generator=g).to(dtype)
    kw = dict(kw)
    fills = {"mask": torch.rand(2, 1, 11, 19, generator=g) < 0.8,
             "bias": torch.randn(11, 19, generator=g).to(dtype),
             "alibi": torch.rand(4, generator=g), "lengths": torch.tensor([19, 7])}
    kw = {key: fills[val] if isinstance(val, str) else val for key, val in kw.items()}
    return q, k, v, kw


@pytest.mark.parametrize("name", list(AUTO_CALLS))
def test_auto_never_fails_for_a_supported_call(name):
    kw, dtype = AUTO_CALLS[name]
    q, k, v, kw = _auto_inputs(kw, dtype)
    call = check_call(q, k, v, **kw)
    supporters = [n for n in BACKENDS if get(n).unsupported(call, q) is None]
    assert supporters, "the table above lists only supported calls"
    torch.manual_seed(0)
    got = qkv.attention(q, k, v, **kw)
    torch.manual_seed(0)
    want = qkv.attention(q.double(), k.double(), v.double(), backend="reference",
                         **{key: val.double() if key == "bias" else val for key, val in kw.items()})
    if kw.get("return_lse"):
        got, want = got[0], want[0]
    tol = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5),
           torch.float16: (2e-3, 4e-3), torch.bfloat16: (1.6e-2, 2.4e-2)}[dtype]
    assert_close(got, want, tol, "out")


def test_auto_picks_chunked_for_softcap_and_dropout_on_cpu():
    q, k, v, kw = _auto_inputs({"softcap": 2.0, "dropout_p": 0.2}, torch.float32)
    assert choose(check_call(q, k, v, **kw), q, "auto").name == "chunked"


def test_auto_prefers_sdpa_for_plain_float32_on_cpu():
    q, k, v, _ = _auto_inputs({}, torch.float32)
    assert choose(check_call(q, q, q, causal=True), q, "auto").name == "sdpa"  # Lq == Lk
    q64 = q.double()
    assert choose(check_call(q64, q64, q64), q64, "auto").name == "chunked"


def test_auto_cpu_policy_for_masked_calls():
    """sdpa takes masked calls up to CPU_SDPA_MASKED_MAX_SCORES scores and decoding; chunked the
    longer ones (benchmarks/RESULTS.md, "auto policy")."""
    def picked(lq, lk):
        q, k = torch.empty(1, 1, lq, 8), torch.empty(1, 1, lk, 8)
        return choose(check_call(q, k, k, kv_lengths=torch.tensor([lk])), q, "auto").name
    assert picked(512, 512) == "sdpa"
    assert picked(512, 513) == "chunked"
    assert picked(1, 100_000) == "sdpa"


def test_auto_cpu_policy_for_bias_mask_and_alibi():
    """Long calls with ALiBi go to chunked (the fused kernel takes it as a column); a bias or a
    boolean mask stays with sdpa at any length (chunked runs them in Python blocks)."""
    q = torch.empty(1, 2, 1024, 8)
    def picked(**kw):
        return choose(check_call(q, q, q, **kw), q, "auto").name
    assert picked(alibi_slopes=torch.ones(2)) == "chunked"
    assert picked(causal=True, alibi_slopes=torch.ones(2)) == "chunked"
    assert picked(bias=torch.zeros(1, 2, 1024, 1024)) == "sdpa"
    assert picked(mask=torch.ones(1024, 1024, dtype=torch.bool)) == "sdpa"
    assert picked(causal=True) == "sdpa"  # torch's own is_causal


def _with_fake(monkeypatch, **fields) -> Backend:
    """Register a CPU backend "fake" ahead of every other in the CPU order, for this test only."""
    _isolated_registry(monkeypatch)
    return register(Backend("fake", get("reference").forward, device_types=("cpu",), **fields),
                    auto_rank={"cpu": 0})


def test_auto_asks_each_backend_whether_it_prefers_the_call(monkeypatch):
    _with_fake(monkeypatch, prefers_fn=lambda call, q: call.causal)
    q = torch.randn(1, 1, 3, 4)
    assert choose(check_call(q, q, q, causal=True), q, "auto").name == "fake"
    assert choose(check_call(q, q, q), q, "auto").name == "sdpa"
    assert qkv.backends("cpu")[0] == "fake"


def test_auto_falls_back_when_no_backend_prefers_the_call(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", {"fake": Backend(
        "fake", get("reference").forward, prefers_fn=lambda call, q: False)})
    q = torch.randn(1, 1, 3, 4)
    assert choose(check_call(q, q, q), q, "auto").name == "fake"


def test_declared_unsupported_features_are_refused(monkeypatch):
    _with_fake(monkeypatch, unsupported_features={"window": "no windows here"})
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(NotImplementedError, match=r"'fake' does not support window \(no windows"):
        qkv.attention(q, q, q, window=(1, 1), backend="fake")
    assert choose(check_call(q, q, q, window=(1, 1)), q, "auto").name != "fake"


def test_backends_resolves_the_device():
    assert qkv.backends("auto") == qkv.backends(None)
    with pytest.raises(ValueError, match="device must be"):
        qkv.backends("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            qkv.backends("cuda")


def test_public_signatures_show_every_keyword_once_defined():
    """attention, attention_varlen and attention_weights take their keywords from spec.Keywords,
    and help() shows each with its default."""
    import inspect
    from dataclasses import fields

    from qkv.attention.spec import PER_PAIR, Keywords

    want = {f.name: f.default for f in fields(Keywords)}

    def keywords(fn):
        params = inspect.signature(fn).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    assert keywords(qkv.attention) == want
    assert keywords(qkv.attention_varlen) == {n: d for n, d in want.items() if n not in PER_PAIR}
    assert set(keywords(qkv.attention_weights)) == set(want) - {"dropout_p", "return_lse",
                                                              "backend"}
    assert "window: 'tuple[int | None, int | None] | None' = None" in str(
        inspect.signature(qkv.attention))
    assert "Exact scaled dot-product attention" in qkv.attention.__doc__


def test_unknown_keywords_raise_type_error():
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(TypeError, match=r"attention\(\) got an unexpected keyword .*'casual'"):
        qkv.attention(q, q, q, casual=True)
    packed, cu = torch.randn(3, 1, 4), torch.tensor([0, 3])
    with pytest.raises(TypeError, match=r"attention_varlen\(\) got an unexpected .*'mask'"):
        qkv.attention_varlen(packed, packed, packed, cu, cu, mask=torch.ones(3, 3) > 0)
    # Positional parameters may still be given by name.
    out = qkv.attention_varlen(packed, packed, packed, cu_seqlens_q=cu, cu_seqlens_k=cu)
    torch.testing.assert_close(out, qkv.attention(q=packed.transpose(0, 1)[None],
                                                  k=packed.transpose(0, 1)[None],
                                                  v=packed.transpose(0, 1)[None])[0]
                               .transpose(0, 1))
