"""GPT-2-layout weights in qkv's DecoderLM against transformers' GPT2LMHeadModel."""

import pytest
import torch

from qkv.generate import generate
from qkv.interop.gpt2 import convert_gpt2_state, gpt2_config, load_gpt2
from qkv.interop.weights import WeightsError

CONFIG = dict(vocab_size=100, n_positions=48, n_embd=64, n_layer=2, n_head=4,
              layer_norm_epsilon=1e-5, bos_token_id=None, eos_token_id=None)


@pytest.fixture(scope="module")
def hf_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**CONFIG)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a missed copy shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _greedy_reference(model, ids, steps):
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def test_logits_and_greedy_match(hf_model):
    ours = load_gpt2(hf_model.state_dict(), hf_model.config)
    assert ours.lm_head.weight is ours.embed.tok_emb.weight  # tied
    ids = torch.randint(0, 100, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf_model(ids).logits
        got, _ = ours(ids)
    diff = (got - want).abs().max().item()
    assert diff < 1e-5, f"max abs logit diff {diff:.2e}"
    prompt = ids[:, :5]
    want_ids = _greedy_reference(hf_model, prompt, 12)
    got_ids = generate(ours, prompt, max_new_tokens=12)
    assert torch.equal(got_ids, want_ids)


def test_safetensors_file_and_config_json(hf_model, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    hf_model.config.to_json_file(str(tmp_path / "config.json"))
    ours = load_gpt2(tmp_path / "model.safetensors")
    ids = torch.arange(20)[None] % 100
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], hf_model(ids).logits, atol=1e-5, rtol=0)


def test_missing_tensor_is_named(hf_model):
    state = dict(hf_model.state_dict())
    del state["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(WeightsError, match=r"missing tensor\(s\) \['h.1.mlp.c_fc.bias'\]"):
        load_gpt2(state, CONFIG)


def test_misshaped_tensor_is_named(hf_model):
    state = dict(hf_model.state_dict())
    state["transformer.h.0.attn.c_attn.weight"] = state["transformer.h.0.attn.c_attn.weight"].t()
    with pytest.raises(WeightsError, match=r"h.0.attn.c_attn.weight has shape \(192, 64\), but "
                                           r"the config's \(n_embd, 3 \* n_embd\) make it "
                                           r"\(64, 192\)"):
        load_gpt2(state, CONFIG)


def test_unexpected_tensor_and_untied_head_are_named(hf_model):
    state = {**hf_model.state_dict(), "transformer.h.0.attn.q_proj.weight": torch.zeros(2)}
    with pytest.raises(WeightsError, match=r"unexpected tensor\(s\) \['h.0.attn.q_proj.weight'\]"):
        load_gpt2(state, CONFIG)
    state = {**hf_model.state_dict(), "lm_head.weight": torch.zeros(100, 64)}
    with pytest.raises(WeightsError, match="lm_head.weight differs from wte.weight"):
        load_gpt2(state, CONFIG)


@pytest.mark.parametrize("field, value, message", [
    ("n_layer", 3, "n_layer=3 does not fit the weights, which hold 2 layers"),
    ("n_embd", 32, r"wte.weight has shape \(100, 64\), but the config's \(vocab_size, n_embd\) "
                   r"make it \(100, 32\)"),
    ("vocab_size", 101, r"wte.weight has shape \(100, 64\)"),
    ("n_positions", 1024, r"wpe.weight has shape \(48, 64\)"),
    ("n_inner", 100, r"h.0.mlp.c_fc.weight has shape \(64, 256\)"),
    ("n_head", 5, "n_heads"),
    ("activation_function", "silu", "activation_function='silu' is not supported"),
    ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx"),
    ("model_type", "bert", "model_type must be 'gpt2'"),
])
def test_config_that_does_not_fit_is_named(hf_model, field, value, message):
    with pytest.raises(WeightsError, match=message):
        convert_gpt2_state(hf_model.state_dict(), {**CONFIG, field: value})


def test_config_needed_and_fields(hf_model):
    with pytest.raises(WeightsError, match="needs its config"):
        load_gpt2(hf_model.state_dict())
    with pytest.raises(WeightsError, match="lacks field 'n_embd'"):
        gpt2_config({k: v for k, v in CONFIG.items() if k != "n_embd"})
    t = gpt2_config({**CONFIG, "layer_norm_epsilon": 1e-6})
    assert (t.norm_eps, t.norm_placement, t.activation, t.tie_embeddings) == \
        (1e-6, "pre", "gelu_tanh", True)
