"""GPT-2-layout weights (transformers' GPT2LMHeadModel / GPT2Model, any size) in qkv's DecoderLM.

GPT-2 is pre-LN with a final LayerNorm, learned absolute positions, tanh-approximated GELU,
biases everywhere and an lm_head tied to the token embedding. Its projections are Conv1D layers
whose weight is stored (in, out), the transpose of nn.Linear's, so every one is transposed here.
`c_attn` already stacks q, k, v along its output, which is qkv's fused `qkv_proj` layout.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from qkv.interop.weights import Expected, WeightsError, checked_state, config_dict, load_model
from qkv.nn import DecoderLM, TransformerConfig

ACTIVATIONS = {  # transformers' activation_function -> qkv's FeedForward activation
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "gelu": "gelu", "relu": "relu",
}


def _field(c: dict, name: str, default=None):
    if name not in c and default is None:
        raise WeightsError(f"config lacks field {name!r}")
    return c.get(name, default)


def gpt2_config(config) -> TransformerConfig:
    """qkv's TransformerConfig for a GPT-2 config (dict, GPT2Config or path to config.json)."""
    c = config_dict(config)
    if c.get("model_type", "gpt2") != "gpt2":
        raise WeightsError(f"config field model_type must be 'gpt2', got {c['model_type']!r}")
    act = c.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise WeightsError(f"config field activation_function={act!r} is not supported; "
                           f"qkv reproduces {sorted(ACTIVATIONS)}")
    for name in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if c.get(name):
            raise WeightsError(f"config field {name}=True is not supported")
    if not c.get("scale_attn_weights", True):
        raise WeightsError("config field scale_attn_weights=False is not supported "
                           "(qkv's TransformerConfig has no attention scale setting)")
    n_embd = _field(c, "n_embd")
    try:
        return TransformerConfig(
            vocab_size=_field(c, "vocab_size"), d_model=n_embd, n_layers=_field(c, "n_layer"),
            n_heads=_field(c, "n_head"), d_ff=c.get("n_inner") or 4 * n_embd,
            max_len=_field(c, "n_positions"), positions="learned", activation=ACTIVATIONS[act],
            norm="layernorm", norm_eps=float(c.get("layer_norm_epsilon", 1e-5)),
            norm_placement="pre", final_norm=True, bias=True,
            tie_embeddings=bool(c.get("tie_word_embeddings", True)),
        )
    except ValueError as e:
        raise WeightsError(f"config does not describe a valid GPT-2: {e}") from e


def _expected(t: TransformerConfig) -> tuple[dict[str, Expected], dict[str, Expected]]:
    """GPT-2's tensor names (without the "transformer." prefix) -> shapes; (required, optional)."""
    V, d, P, ff = t.vocab_size, t.d_model, t.max_len, t.d_ff
    vec = Expected((d,), "(n_embd,)")
    req = {
        "wte.weight": Expected((V, d), "(vocab_size, n_embd)"),
        "wpe.weight": Expected((P, d), "(n_positions, n_embd)"),
        "ln_f.weight": vec, "ln_f.bias": vec,
    }
    for i in range(t.n_layers):
        p = f"h.{i}."
        for norm in ("ln_1", "ln_2"):
            req[f"{p}{norm}.weight"] = vec
            req[f"{p}{norm}.bias"] = vec
        req[f"{p}attn.c_attn.weight"] = Expected((d, 3 * d), "(n_embd, 3 * n_embd)")
        req[f"{p}attn.c_attn.bias"] = Expected((3 * d,), "(3 * n_embd,)")
        req[f"{p}attn.c_proj.weight"] = Expected((d, d), "(n_embd, n_embd)")
        req[f"{p}attn.c_proj.bias"] = vec
        req[f"{p}mlp.c_fc.weight"] = Expected((d, ff), "(n_embd, n_inner)")
        req[f"{p}mlp.c_fc.bias"] = Expected((ff,), "(n_inner,)")
        req[f"{p}mlp.c_proj.weight"] = Expected((ff, d), "(n_inner, n_embd)")
        req[f"{p}mlp.c_proj.bias"] = vec
    head = {"lm_head.weight": Expected((V, d), "(vocab_size, n_embd)")}
    if t.tie_embeddings:
        return req, head
    return {**req, **head}, {}


def _ignored(key: str) -> bool:
    # The causal-mask buffers that older transformers versions saved with each layer.
    return key.endswith(".attn.bias") or key.endswith(".attn.masked_bias")


def convert_gpt2_state(state: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Validate a GPT-2 state dict against its config and rename it to qkv DecoderLM keys."""
    t = gpt2_config(config)
    n = t.n_layers
    state = checked_state(state, prefixes=("transformer.",), layer_prefix="h.", n_layers=n,
                          layers_field="n_layer", expected=_expected(t), ignored=_ignored,
                          source="GPT-2 weights")
    wte = state["wte.weight"]
    if t.tie_embeddings and "lm_head.weight" in state and \
            not torch.equal(state["lm_head.weight"], wte):
        raise WeightsError("lm_head.weight differs from wte.weight, but the config ties them "
                           "(tie_word_embeddings=True)")
    out = {
        "embed.tok_emb.weight": wte,
        "embed.pos_emb.weight": state["wpe.weight"],
        "final_norm.weight": state["ln_f.weight"],
        "final_norm.bias": state["ln_f.bias"],
        "lm_head.weight": state["lm_head.weight"] if not t.tie_embeddings else wte,
    }
    conv = {"attn.c_attn": "attn.qkv_proj", "attn.c_proj": "attn.out_proj",
            "mlp.c_fc": "ffn.fc_in", "mlp.c_proj": "ffn.fc_out"}
    norms = {"ln_1": "attn_norm", "ln_2": "ffn_norm"}
    for i in range(n):
        p, q = f"h.{i}.", f"layers.{i}."
        for theirs, ours in conv.items():
            out[f"{q}{ours}.weight"] = state[f"{p}{theirs}.weight"].t()  # Conv1D (in, out)
            out[f"{q}{ours}.bias"] = state[f"{p}{theirs}.bias"]
        for theirs, ours in norms.items():
            out[f"{q}{ours}.weight"] = state[f"{p}{theirs}.weight"]
            out[f"{q}{ours}.bias"] = state[f"{p}{theirs}.bias"]
    return out


def load_gpt2(weights: Mapping[str, torch.Tensor] | str | os.PathLike,
              config=None) -> DecoderLM:
    """A qkv DecoderLM holding GPT-2 weights.

    `weights` is a state dict (GPT2LMHeadModel's, with or without the "transformer." prefix) or
    a .safetensors file. `config` is a dict, a GPT2Config or a config.json path; if None, the
    config.json beside the safetensors file is read. Raises WeightsError naming the tensor or
    config field when a tensor is missing, unexpected or misshaped, or the config asks for
    something qkv does not build. No weight is copied before every check has passed.
    """
    if isinstance(weights, (str, os.PathLike)):
        path = Path(weights)
        if config is None:
            config = path.parent / "config.json"
            if not config.is_file():
                raise WeightsError(f"no config given and no config.json beside {path}")
    elif config is None:
        raise WeightsError("a state dict needs its config (dict, GPT2Config or config.json path)")
    return load_model(DecoderLM(gpt2_config(config)), weights,
                      lambda state: convert_gpt2_state(state, config))
