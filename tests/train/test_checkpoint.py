import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import SafetensorError

from qkv.data import byte_tokenizer
from qkv.nn import DecoderLM, TransformerConfig
from qkv.train import (
    CheckpointError,
    find_latest,
    list_checkpoints,
    load_model,
    load_weights,
    rng,
    save_checkpoint,
    verify,
)
from qkv.train import checkpoint as ckpt
from qkv.train.loop import make_optimizer
from qkv.train.resume import load_training_state
from tests.train.conftest import tiny_config


def _model(d_model=32, seed=0):
    torch.manual_seed(seed)
    return DecoderLM(TransformerConfig(vocab_size=258, d_model=d_model, n_layers=1, n_heads=2,
                                       max_len=32))


def _trained_optimizer(model):
    opt = make_optimizer(model, tiny_config("unused"))
    _, loss = model(torch.randint(0, 258, (2, 8)), torch.randint(0, 258, (2, 8)))
    loss.backward()
    opt.step()
    return opt


def _save(run, step, model=None, **kw):
    model = model or _model(seed=step)
    return save_checkpoint(run, step, model=model, tokenizer=byte_tokenizer(),
                           optimizer=_trained_optimizer(model), trainer_state={"x": step}, **kw)


def test_round_trip_weights_optimizer_and_rng(tmp_path):
    model = _model()
    opt = _trained_optimizer(model)
    rng_json, rng_tensors = rng.rng_state()
    expected = torch.rand(3)
    path = save_checkpoint(tmp_path, 5, model=model, tokenizer=byte_tokenizer(), optimizer=opt,
                           trainer_state={"rng": rng_json, "data": {"epoch": 1, "offset": 8}},
                           extra_tensors=rng_tensors)
    assert verify(path)["step"] == 5
    loaded, tokenizer, folder = load_model(tmp_path)
    assert folder == path and tokenizer.vocab_size == 258
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    assert loaded.lm_head.weight is loaded.embed.tok_emb.weight  # still tied

    fresh = _model(seed=1)
    opt2 = make_optimizer(fresh, tiny_config("unused"))
    state, extra = load_training_state(path, opt2)
    assert state["step"] == 5 and state["data"] == {"epoch": 1, "offset": 8}
    before, after = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert before.keys() == after.keys()
    for pid in before:
        assert all(torch.equal(before[pid][k], after[pid][k]) for k in before[pid])
    torch.manual_seed(123)
    rng.set_rng_state(state["rng"], extra)
    assert torch.equal(torch.rand(3), expected)


def test_keeps_the_last_k(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]


def test_truncated_checkpoint_is_reported_and_skipped(tmp_path):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    weights = newest / ckpt.MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        verify(newest)
    warnings = []
    assert find_latest(tmp_path, warn=warnings.append).name == "step-00000001"
    assert "step-00000002" in warnings[0] and "falling back to step-00000001" in warnings[0]


def test_corrupt_byte_fails_the_checksum(tmp_path):
    path = _save(tmp_path, 1)
    data = bytearray((path / ckpt.MODEL_FILE).read_bytes())
    data[-5] ^= 0xFF
    (path / ckpt.MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_model(path)
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        find_latest(tmp_path)


def test_full_disk_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    good = _save(tmp_path, 1)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "save_file", no_space)
    with pytest.raises(CheckpointError, match="No space left") as e:
        _save(tmp_path, 2)
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == errno.ENOSPC
    assert list_checkpoints(tmp_path) == [good]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [good.name]
    assert find_latest(tmp_path) == good
    load_model(good)


def test_kill_during_a_write_keeps_earlier_checkpoints(tmp_path):
    good = _save(tmp_path, 1)
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.getcwd()!r})
        from safetensors.torch import save_file
        from qkv.train import checkpoint as ckpt
        from tests.train.test_checkpoint import _save

        def half_then_die(tensors, path):
            save_file(tensors, path)
            with open(path, "r+b") as f:
                f.truncate(64)
            os.kill(os.getpid(), signal.SIGKILL)

        ckpt.save_file = half_then_die
        _save({str(tmp_path)!r}, 2)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert list_checkpoints(tmp_path) == [good]  # the half-written one never got its name
    assert find_latest(tmp_path) == good
    _save(tmp_path, 3)  # the next save clears the leftover temporary folder
    assert all(not p.name.startswith(".") for p in (tmp_path / "checkpoints").iterdir())


def test_wrong_shape_names_the_tensor(tmp_path):
    path = _save(tmp_path, 1, model=_model(d_model=32))
    with pytest.raises(CheckpointError, match=r"embed\.tok_emb\.weight.*\(258, 32\).*\(258, 64\)"):
        load_weights(_model(d_model=64), path)


def test_safetensors_error_is_reported_like_a_full_disk(tmp_path, monkeypatch):
    good = _save(tmp_path, 1)

    def storage_full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: '
                              'StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(ckpt, "save_file", storage_full)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*step-00000002: .*"
                                              r"No space left on device.*earlier checkpoints "
                                              r"are untouched"):
        _save(tmp_path, 2)
    assert list_checkpoints(tmp_path) == [good]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [good.name]


def test_a_complete_checkpoint_is_never_rewritten(tmp_path):
    saved = _model(seed=1)
    first = _save(tmp_path, 1, model=saved)
    stamp = (first / ckpt.MANIFEST).stat().st_mtime_ns
    again = _save(tmp_path, 1, model=_model(seed=2))
    assert again == first and (first / ckpt.MANIFEST).stat().st_mtime_ns == stamp
    loaded, _, _ = load_model(first)
    assert torch.equal(loaded.lm_head.weight, saved.lm_head.weight)


def test_describe_checkpoints_and_read_run_config(tmp_path, tiny_data):
    from qkv.train import describe_checkpoints, read_run_config, train

    run = tmp_path / "run"
    result = train(tiny_config(run, max_steps=4, checkpoint_interval=2, eval_interval=2),
                   data=tiny_data)
    broken = run / "checkpoints" / "step-00000004" / ckpt.MODEL_FILE
    broken.write_bytes(broken.read_bytes()[:-4])
    rows = describe_checkpoints(run)
    assert [(r["step"], r["usable"], r["latest"]) for r in rows] == [(2, True, True),
                                                                     (4, False, False)]
    assert rows[0]["path"] == str(run / "checkpoints" / "step-00000002")
    assert set(rows[0]["eval"]) >= {"loss", "ppl", "bpb"} and rows[0]["tokens_seen"] > 0
    assert "truncated" in rows[1]["problem"]
    assert read_run_config(run)["max_steps"] == 4 == read_run_config(rows[0]["path"])["max_steps"]
    assert read_run_config(run) == result_config(result)


def result_config(result):
    import json

    return json.loads((result.run_dir / "config.json").read_text())


@pytest.mark.parametrize("state", ["null", '"str"', "[1, 2]", "3"])
def test_read_trainer_state_refuses_json_that_is_not_an_object(tmp_path, state):
    (tmp_path / "trainer.json").write_text(state)
    with pytest.raises(CheckpointError, match="not an object"):
        ckpt.read_trainer_state(tmp_path)
    assert ckpt.read_trainer_state(tmp_path, strict=False) == {}
