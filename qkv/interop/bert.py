"""BERT-layout weights (transformers' BertModel, as in all-MiniLM-L6-v2) in qkv's post-LN Encoder.

BERT is post-LN with exact (erf) GELU, learned absolute positions, token type embeddings and a
LayerNorm after the embeddings. Its separate query/key/value projections become qkv's fused
`qkv_proj` (rows stacked q, k, v). The pooler is not part of the encoder: it is accepted (with
the right shape) and left out.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from qkv.interop.weights import Expected, WeightsError, checked_state, config_dict, load_model
from qkv.nn import Encoder, TransformerConfig

_SUPPORTED = {  # field: values qkv's Encoder reproduces
    "hidden_act": ("gelu",),
    "position_embedding_type": ("absolute", None),
}
_UNSUPPORTED_TRUE = ("is_decoder", "add_cross_attention")


def bert_config(config) -> TransformerConfig:
    """qkv's TransformerConfig for a BERT config (dict, BertConfig or path to config.json)."""
    c = config_dict(config)
    if c.get("model_type", "bert") != "bert":
        raise WeightsError(f"config field model_type must be 'bert', got {c['model_type']!r}")
    for name, allowed in _SUPPORTED.items():
        if c.get(name) not in allowed:
            raise WeightsError(f"config field {name}={c.get(name)!r} is not supported; "
                               f"qkv reproduces {[a for a in allowed if a]}")
    for name in _UNSUPPORTED_TRUE:
        if c.get(name):
            raise WeightsError(f"config field {name}=True is not supported (encoder only)")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "max_position_embeddings", "type_vocab_size",
                "layer_norm_eps")
    absent = [name for name in required if name not in c]
    if absent:
        raise WeightsError(f"config lacks field(s) {absent}")
    try:
        return TransformerConfig(
            vocab_size=c["vocab_size"], d_model=c["hidden_size"], n_layers=c["num_hidden_layers"],
            n_heads=c["num_attention_heads"], d_ff=c["intermediate_size"],
            max_len=c["max_position_embeddings"], positions="learned", activation="gelu",
            norm="layernorm", norm_eps=float(c["layer_norm_eps"]), norm_placement="post",
            embed_norm=True, final_norm=False, n_token_types=c["type_vocab_size"], bias=True,
            tie_embeddings=False,
        )
    except ValueError as e:
        raise WeightsError(f"config does not describe a valid encoder: {e}") from e


def _expected(c: dict) -> tuple[dict[str, Expected], dict[str, Expected]]:
    """BERT's tensor names -> shapes the config implies; (required, optional)."""
    V, d, P, T = c["vocab_size"], c["hidden_size"], c["max_position_embeddings"], \
        c["type_vocab_size"]
    ff = c["intermediate_size"]
    dd = Expected((d, d), "(hidden_size, hidden_size)")
    vec = Expected((d,), "(hidden_size,)")
    req = {
        "embeddings.word_embeddings.weight": Expected((V, d), "(vocab_size, hidden_size)"),
        "embeddings.position_embeddings.weight":
            Expected((P, d), "(max_position_embeddings, hidden_size)"),
        "embeddings.token_type_embeddings.weight":
            Expected((T, d), "(type_vocab_size, hidden_size)"),
        "embeddings.LayerNorm.weight": vec, "embeddings.LayerNorm.bias": vec,
    }
    for i in range(c["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            req[f"{p}attention.self.{name}.weight"] = dd
            req[f"{p}attention.self.{name}.bias"] = vec
        req[f"{p}attention.output.dense.weight"] = dd
        req[f"{p}attention.output.dense.bias"] = vec
        req[f"{p}intermediate.dense.weight"] = Expected((ff, d),
                                                        "(intermediate_size, hidden_size)")
        req[f"{p}intermediate.dense.bias"] = Expected((ff,), "(intermediate_size,)")
        req[f"{p}output.dense.weight"] = Expected((d, ff), "(hidden_size, intermediate_size)")
        req[f"{p}output.dense.bias"] = vec
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            req[f"{p}{norm}.weight"] = vec
            req[f"{p}{norm}.bias"] = vec
    optional = {"pooler.dense.weight": dd, "pooler.dense.bias": vec}
    return req, optional


def _ignored(key: str) -> bool:
    return key == "embeddings.position_ids"  # a buffer of 0..P-1 that older versions saved


def convert_bert_state(state: Mapping[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Validate a BERT state dict against its config and rename it to qkv Encoder keys."""
    c = config_dict(config)
    bert_config(c)  # validates the fields
    n = c["num_hidden_layers"]
    state = checked_state(state, prefixes=("bert.",), layer_prefix="encoder.layer.", n_layers=n,
                          layers_field="num_hidden_layers", expected=_expected(c),
                          ignored=_ignored, source="BERT weights")
    out = {
        "embed.tok_emb.weight": state["embeddings.word_embeddings.weight"],
        "embed.pos_emb.weight": state["embeddings.position_embeddings.weight"],
        "embed.type_emb.weight": state["embeddings.token_type_embeddings.weight"],
        "embed.norm.weight": state["embeddings.LayerNorm.weight"],
        "embed.norm.bias": state["embeddings.LayerNorm.bias"],
    }
    for i in range(n):
        p, q = f"encoder.layer.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            out[f"{q}attn.qkv_proj.{kind}"] = torch.cat(
                [state[f"{p}attention.self.{name}.{kind}"] for name in ("query", "key", "value")]
            )  # (3 d, d) / (3 d,)
            out[f"{q}attn.out_proj.{kind}"] = state[f"{p}attention.output.dense.{kind}"]
            out[f"{q}attn_norm.{kind}"] = state[f"{p}attention.output.LayerNorm.{kind}"]
            out[f"{q}ffn.fc_in.{kind}"] = state[f"{p}intermediate.dense.{kind}"]
            out[f"{q}ffn.fc_out.{kind}"] = state[f"{p}output.dense.{kind}"]
            out[f"{q}ffn_norm.{kind}"] = state[f"{p}output.LayerNorm.{kind}"]
    return out


def load_bert(weights: Mapping[str, torch.Tensor] | str | os.PathLike, config) -> Encoder:
    """A qkv Encoder holding BERT weights (a state dict or a .safetensors path).

    Raises WeightsError naming the tensor or config field when the weights are missing a tensor,
    hold an unexpected or misshaped one, or the config asks for something qkv does not build.
    """
    return load_model(Encoder(bert_config(config)), weights,
                      lambda state: convert_bert_state(state, config))
