"""The plan's arithmetic against cases computed by hand."""

import math

import pytest

from qkv.nn import TransformerConfig
from qkv.plan import ModelSpec, Shapes, count_params, crossover, fits, make_plan, memory, step_flops

# vocab 10, d 8, one layer of 2 heads (head dim 4), d_ff 16, 4 learned positions, tied, biases
TINY = ModelSpec("tiny", "decoder", TransformerConfig(vocab_size=10, d_model=8, n_layers=1,
                                                      n_heads=2, d_ff=16, max_len=4))
GQA = ModelSpec("gqa", "decoder", TransformerConfig(vocab_size=10, d_model=128, n_layers=3,
                                                    n_heads=8, n_kv_heads=2, positions="rope",
                                                    activation="swiglu", norm="rmsnorm",
                                                    bias=False))


def tiny_memory(n, mode="prefill", backend="reference", batch=1):
    return memory(TINY, Shapes.of(TINY), count_params(TINY), n, batch, "fp32", mode, backend)


def test_parameters_of_a_tiny_config():
    embeddings = 10 * 8 + 4 * 8
    attention = (8 * 24 + 24) + (8 * 8 + 8)  # fused q|k|v, out projection, with biases
    ffn = (8 * 16 + 16) + (16 * 8 + 8)
    norms = 2 * (8 + 8)
    final_norm = 8 + 8
    assert count_params(TINY) == embeddings + attention + ffn + norms + final_norm == 728


def test_flops_split_of_one_step():
    matmul_weights = 8 * 24 + 8 * 8 + 2 * 8 * 16  # 512 per token
    flops = step_flops(Shapes.of(TINY), 4, 1, "prefill")
    assert flops["linear"] == 2 * (4 * matmul_weights + 1 * 8 * 10)  # LM head: last token only
    assert flops["attention"] == 4 * 2 * 4 * 4 * 4 / 2  # 4·H·n²·d / 2, causal
    train = step_flops(Shapes.of(TINY), 4, 1, "train")
    assert train["linear"] == 3 * 2 * 4 * (matmul_weights + 8 * 10)
    assert train["attention"] == 3.5 * flops["attention"]


def test_crossover_where_attention_passes_half():
    # train: per token 4·n·d_attn·layers / 2 (causal) · 3.5 against 2·(weights)·3
    per_n = 4 * 8 * 1 / 2 * 3.5
    rest = 2 * (512 + 8 * 10) * 3
    by_hand = next(n for n in range(1, 10_000) if per_n * n > rest)
    assert crossover(Shapes.of(TINY), "train") == by_hand == 64
    s = Shapes.of(TINY)
    at = lambda n: step_flops(s, n, 1, "train")  # noqa: E731
    assert at(by_hand)["attention"] > at(by_hand)["linear"]
    assert at(by_hand - 1)["attention"] <= at(by_hand - 1)["linear"]
    # a decode step's query sees every key: the crossover comes at half the length or less
    assert crossover(s, "decode") == next(n for n in range(1, 10_000)
                                          if 4 * 8 * n > 2 * (512 + 80))


def test_kv_cache_bytes_with_gqa():
    m = memory(GQA, Shapes.of(GQA), count_params(GQA), 100, 2, "bf16", "decode", "sdpa")
    layers, batch, kv_heads, n, head_dim, bf16 = 3, 2, 2, 100, 16, 2
    assert m["kv_cache"] == 2 * layers * batch * kv_heads * n * head_dim * bf16 == 76_800


def test_largest_n_for_reference_solves_the_quadratic():
    # prefill, fp32: weights 728·4, last logits 10·4, per token d + the busiest moment
    # (2d + q|k|v + 2·d_attn = 56) floats, and reference's four n x n fp32 matrices per head
    # plus the one-byte causal mask: total(n) = 33 n² + 256 n + 2952
    a, b, c = 4 * 2 * 4 + 1, 4 * (8 + 56), 728 * 4 + 40
    for n in (1, 7, 100):
        assert tiny_memory(n)["total"] == a * n * n + b * n + c
    budget = 1_000_000
    by_hand = math.floor((-b + math.sqrt(b * b - 4 * a * (c - budget))) / (2 * a))
    assert fits(lambda n: tiny_memory(n)["total"], budget) == by_hand == 169


def test_largest_n_for_chunked_is_linear():
    # past 512 tokens chunked's blocks are full: 3 blocks of H x 256 x 512 fp32
    blocks = 3 * 2 * 256 * 512 * 4
    budget = 10_000_000
    by_hand = (budget - 2952 - blocks) // 256
    assert by_hand > 512
    assert fits(lambda n: tiny_memory(n, backend="chunked")["total"], budget) == by_hand
    assert fits(lambda n: tiny_memory(n, backend="sdpa")["total"], budget) == \
        (budget - 2952) // 256


def test_fits_edges():
    assert fits(lambda n: 10 * n, 5) == 0
    assert fits(lambda n: 10 * n, 10) == 1
    assert fits(lambda n: n * n, 10**6) == 1000
    assert fits(lambda n: 0, 1, limit=64) == 64


def test_training_peak_counts_gradients_against_activations_not_on_top():
    m = tiny_memory(64, mode="train", backend="sdpa")
    assert m["gradients"] == 728 * 4 and m["optimizer"] == 728 * 8
    assert m["attention"] == 64 * 24 * 4  # dq, dk, dv in fp32
    head_backward = 2 * 64 * 10 * 4  # the logits' and log-softmax's gradients, done before
    busy = m["activations"] + m["attention"] - min(head_backward, m["attention"])
    assert m["total"] == m["weights"] + m["optimizer"] + max(busy, m["gradients"]) == 52_256


def test_plan_reports_every_cpu_backend_and_refuses_bad_arguments():
    plan = make_plan(TINY, 4, budget=100_000, mode="prefill")
    assert [b.backend for b in plan.backends] == ["sdpa", "chunked", "reference"]
    assert plan.time_source == "uncalibrated" and plan.suggestion["backend"] in {"sdpa",
                                                                                 "chunked"}
    assert all(b.fits for b in plan.backends)
    tight = make_plan(TINY, 4, budget=100, mode="prefill")
    assert all(b.max_seq_len == 0 for b in tight.backends)
    assert any("too small for even n = 1" in note for note in tight.notes)
    for kwargs, word in (({"seq_len": 0}, "seq_len"), ({"mode": "serve"}, "mode"),
                         ({"dtype": "int8"}, "dtype"), ({"batch": 0}, "batch")):
        with pytest.raises(ValueError, match=word):
            make_plan(TINY, **{"seq_len": 4, **kwargs})
    encoder = ModelSpec("enc", "encoder", TINY.config)
    with pytest.raises(ValueError, match="decode"):
        make_plan(encoder, 4, mode="decode")


@pytest.mark.parametrize("mode", ["train", "prefill", "decode"])
@pytest.mark.parametrize("name", ["gpt2", "tiny", "gqa"])
def test_crossover_is_where_the_printed_share_passes_half(mode, name):
    from qkv.plan.presets import load_model

    spec = {"tiny": TINY, "gqa": GQA}.get(name) or load_model(name)
    n = crossover(Shapes.of(spec), mode)
    assert make_plan(spec, n, mode=mode).attention_share > 0.5
    if n > 1:
        assert make_plan(spec, n - 1, mode=mode).attention_share <= 0.5
    if name == "gpt2" and mode == "prefill":  # the LM head counts on the last position only
        assert make_plan(spec, 11_000, mode=mode).attention_share > 0.5 and n < 11_000
