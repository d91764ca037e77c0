"""evaluate_checkpoint: the run's corpus settings come from qkv.train.checkpoint.read_run_config,
and a fallback past a damaged checkpoint is a warning, never a line on stdout."""

import json

import pytest
import torch

from qkv.data import CorpusError, byte_tokenizer
from qkv.nn import DecoderLM, TransformerConfig
from qkv.train import save_checkpoint
from qkv.train.checkpoint import MODEL_FILE, read_run_config
from qkv.train.evaluate import evaluate_checkpoint


def _run(tmp_path, corpus_text: str, steps=(1, 2), **config):
    """A run folder with checkpoints `steps` of an untrained tiny model on a one-file corpus."""
    source = tmp_path / "one.txt"
    source.write_text(corpus_text)
    config = {"corpus": str(source), "seq_len": 8, "max_bytes": None, **config}
    torch.manual_seed(0)
    model = DecoderLM(TransformerConfig(vocab_size=258, d_model=16, n_layers=1, n_heads=2,
                                        max_len=8))
    run = tmp_path / "run"
    optimizer = torch.optim.AdamW(model.parameters())
    folders = [save_checkpoint(run, s, model=model, tokenizer=byte_tokenizer(),
                               optimizer=optimizer, trainer_state={"config": config})
               for s in steps]
    assert read_run_config(folders[0]) == config  # never the default corpus: it is large
    return run, folders


def test_the_runs_split_settings_pick_the_text(tmp_path):
    text = "".join(f"line {i:03d}\n" for i in range(200))
    run, _ = _run(tmp_path, text, split="position", split_fractions=[0.5, 0.25, 0.25])
    result = evaluate_checkpoint(run, split="test", batch_size=4)
    assert result["corpus"] == str(tmp_path / "one.txt")
    assert result["bytes"] == pytest.approx(len(text) / 4, rel=0.05)  # the last quarter


def test_fallback_is_a_warning_not_stdout(tmp_path, capsys):
    run, folders = _run(tmp_path, "".join(f"word {i}\n" for i in range(300)), split="auto")
    weights = folders[-1] / MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.warns(UserWarning, match="falling back to step-00000001"):
        result = evaluate_checkpoint(run, split="validation", batch_size=4)
    assert result["checkpoint"].endswith("step-00000001")
    assert capsys.readouterr().out == ""
    seen = []
    evaluate_checkpoint(run, split="validation", batch_size=4, warn=seen.append)
    assert len(seen) == 1 and "falling back" in seen[0]
    json.dumps(result)  # the CLI's --json prints it as it is


def test_runs_saved_before_split_existed_split_by_document(tmp_path):
    run, _ = _run(tmp_path, "".join(f"word {i}\n" for i in range(300)))
    with pytest.raises(CorpusError, match="split of .* has 0 tokens"):
        evaluate_checkpoint(run, split="validation", batch_size=4)


@pytest.mark.parametrize("device, message", [("tpu", "device must be"),
                                             ("cuda:99", "cuda:99")])
def test_device_is_resolved_with_a_named_error(tmp_path, device, message):
    run, _ = _run(tmp_path, "".join(f"word {i}\n" for i in range(300)), split="auto")
    with pytest.raises(ValueError, match=message):
        evaluate_checkpoint(run, split="validation", device=device)
    assert evaluate_checkpoint(run, split="validation", device="auto")["tokens"] > 0
