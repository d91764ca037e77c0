"""Activation checkpointing as a switch on the models: same gradients, same parameters."""

import pytest
import torch

from qkv.nn import DecoderLM, DynamicCache, Encoder, EncoderDecoder, EncoderDecoderConfig


def _layers(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__ in ("EncoderLayer", "DecoderLayer")]


def _layer_calls(model) -> list[int]:
    """A counter of layer forward calls, kept up to date by hooks."""
    calls = [0]
    for module in _layers(model):
        module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _grads(model, loss_fn) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss_fn(model).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _lm_loss(model):
    idx = torch.randint(0, 37, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    return model(idx, idx, attention_mask=mask)[1]


def _encoder_loss(model):
    idx = torch.randint(0, 37, (2, 7))
    return model(idx, lengths=torch.tensor([7, 4])).pow(2).sum()


def _encdec_loss(model):
    src, tgt = torch.randint(0, 37, (2, 6)), torch.randint(0, 37, (2, 5))
    return model(src, tgt, tgt, src_lengths=torch.tensor([6, 3]))[1]


@pytest.mark.parametrize("build, loss_fn", [
    (lambda t: DecoderLM(t(positions="rope", dropout=0.1)), _lm_loss),
    (lambda t: Encoder(t(positions="learned", norm_placement="post")), _encoder_loss),
    (lambda t: EncoderDecoder(EncoderDecoderConfig(encoder=t(), decoder=t(positions="alibi"))),
     _encdec_loss),
])
def test_checkpointing_keeps_gradients_and_parameter_names(tiny, build, loss_fn):
    model = build(tiny).double().train()
    names = [name for name, _ in model.named_parameters()]
    torch.manual_seed(1)
    plain = _grads(model, loss_fn)
    model.set_activation_checkpointing()
    calls = _layer_calls(model)
    torch.manual_seed(1)
    checkpointed = _grads(model, loss_fn)
    assert [name for name, _ in model.named_parameters()] == names
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-10, atol=1e-12)
    n_layers = len(_layers(model))
    assert calls[0] == 2 * n_layers  # every layer ran again in backward
    model.set_activation_checkpointing(False)
    calls[0] = 0
    _grads(model, loss_fn)
    assert calls[0] == n_layers


def test_checkpointing_is_skipped_without_grad_or_with_a_cache(tiny):
    lm = DecoderLM(tiny()).eval()
    lm.set_activation_checkpointing(True)
    calls = _layer_calls(lm)
    idx = torch.randint(0, 37, (1, 4))
    with torch.no_grad():
        lm(idx)
    assert calls[0] == 2
    logits, _ = lm(idx, cache=DynamicCache())
    logits.sum().backward()
    assert calls[0] == 4
    with pytest.raises(ValueError, match="enabled"):
        lm.set_activation_checkpointing("yes")
