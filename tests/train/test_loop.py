import json

import pytest
import torch
from safetensors.torch import load_file

from qkv.data import CorpusError
from qkv.train import train
from tests.train.conftest import tiny_config


def _weights(result):
    return load_file(str(result.checkpoint / "model.safetensors"))


def _run(tmp_path, name, tiny_data, **overrides):
    return train(tiny_config(tmp_path / name, **overrides), data=tiny_data)


def test_trains_evaluates_logs_and_saves(tmp_path, tiny_data):
    result = _run(tmp_path, "run", tiny_data, max_steps=8, checkpoint_interval=4,
                  eval_interval=4)
    assert sorted(result.losses) == list(range(1, 9))
    assert result.losses[8] < result.losses[1]
    assert set(result.eval) >= {"loss", "ppl", "bpb"}
    assert result.eval["ppl"] == pytest.approx(torch.tensor(result.eval["loss"]).exp().item())
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").open()]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == list(range(1, 9))
    assert [r["step"] for r in records if r["kind"] == "eval"] == [4, 8]
    assert [p.name for p in (result.run_dir / "checkpoints").iterdir()] != []
    assert result.checkpoint.name == "step-00000008"


def test_same_seed_same_losses_other_seed_not(tmp_path, tiny_data):
    a = _run(tmp_path, "a", tiny_data, max_steps=3)
    b = _run(tmp_path, "b", tiny_data, max_steps=3)
    c = _run(tmp_path, "c", tiny_data, max_steps=3, seed=1)
    assert a.losses == b.losses
    assert a.losses != c.losses


@pytest.mark.parametrize("grad_clip", [None, 0.05])
def test_accumulating_two_half_batches_equals_one_full_batch(tmp_path, tiny_data, grad_clip):
    # No biases: the key bias has an exactly zero gradient, whose rounding noise Adam would
    # blow up to a full step in either direction.
    model = {"d_model": 32, "n_layers": 1, "n_heads": 2, "bias": False}
    full = _run(tmp_path, "full", tiny_data, max_steps=3, batch_size=4, grad_accum=1,
                grad_clip=grad_clip, model=model)
    accum = _run(tmp_path, "accum", tiny_data, max_steps=3, batch_size=2, grad_accum=2,
                 grad_clip=grad_clip, model=model)
    for step in full.losses:
        assert accum.losses[step] == pytest.approx(full.losses[step], abs=1e-6)
    wf, wa = _weights(full), _weights(accum)
    for name in wf:
        torch.testing.assert_close(wa[name], wf[name], atol=1e-6, rtol=1e-5)


def test_clipping_changes_the_update(tmp_path, tiny_data):
    free = _run(tmp_path, "free", tiny_data, max_steps=3, grad_clip=None)
    clipped = _run(tmp_path, "clipped", tiny_data, max_steps=3, grad_clip=1e-3)
    assert free.losses[1] == clipped.losses[1]  # same start
    assert free.losses[3] != clipped.losses[3]


def test_activation_checkpointing_gives_the_same_run(tmp_path, tiny_data):
    plain = _run(tmp_path, "plain", tiny_data, max_steps=3)
    recomputed = _run(tmp_path, "recomputed", tiny_data, max_steps=3,
                      activation_checkpointing=True)
    for step in plain.losses:
        assert recomputed.losses[step] == pytest.approx(plain.losses[step], abs=1e-6)


def test_bf16_autocast_trains(tmp_path, tiny_data):
    result = _run(tmp_path, "bf16", tiny_data, max_steps=4, precision="bf16")
    assert all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())


def test_fp16_needs_cuda(tmp_path, tiny_data):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        _run(tmp_path, "fp16", tiny_data, precision="fp16")


def test_existing_run_needs_resume_or_overwrite(tmp_path, tiny_data):
    _run(tmp_path, "run", tiny_data, max_steps=2)
    with pytest.raises(FileExistsError, match="--resume"):
        _run(tmp_path, "run", tiny_data, max_steps=2)
    again = train(tiny_config(tmp_path / "run", max_steps=2), data=tiny_data, overwrite=True)
    assert again.step == 2


def test_resume_refuses_a_different_model_shape(tmp_path, tiny_data):
    _run(tmp_path, "run", tiny_data, max_steps=2)
    wider = tiny_config(tmp_path / "run", max_steps=4, model={"d_model": 64, "n_layers": 1,
                                                             "n_heads": 2})
    with pytest.raises(ValueError, match=r"model\.d_model: 32 in the run, 64 now"):
        train(wider, data=tiny_data, resume=True)


def test_empty_and_non_text_corpora(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match="no non-empty text"):
        train(tiny_config(tmp_path / "run", corpus=str(empty)))
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "a.py").write_text("x = 1\n" * 100)
    (binary / "blob.bin").write_bytes(b"\x89PNG\x00\x01\x02")
    with pytest.raises(CorpusError, match=r"blob\.bin is not a text file"):
        train(tiny_config(tmp_path / "run", corpus=str(binary)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(tiny_config(tmp_path / "run", corpus=str(tmp_path / "missing")))
