"""Checks made up front, before data preparation or allocation: model size against memory,
the position table against seq_len, corpus keys (text_key, split, split_fractions)."""

import json

import pytest
import torch

from qkv.data import CorpusError
from qkv.nn import DecoderLM
from qkv.train import TrainConfig, prepare_data
from qkv.train.config import TRAINING_BYTES_PER_PARAM, check_fits, count_params, device_memory
from qkv.train.data import load_corpus

SMALL = {"tokenizer": "byte", "seq_len": 16, "batch_size": 2,
         "model": {"d_model": 16, "n_layers": 1, "n_heads": 2}, "device": "cpu"}


@pytest.mark.parametrize("model", [{"d_model": 32, "n_layers": 2, "n_heads": 2},
                                   {"d_model": 48, "n_layers": 1, "n_heads": 4,
                                    "positions": "rope", "tie_embeddings": False}])
def test_count_params_matches_the_built_model(model):
    config = TrainConfig(tokenizer="bpe", vocab_size=300, seq_len=20, model=model)
    built = DecoderLM(config.model_config(300))
    assert count_params(config) == built.num_params()
    assert count_params(config, vocab_size=258) == DecoderLM(config.model_config(258)).num_params()


def test_an_impossible_model_is_refused_before_allocation():
    config = TrainConfig(model={"d_model": 100_000, "n_layers": 100}, device="cpu")
    with pytest.raises(ValueError) as e:
        check_fits(config)
    message = str(e.value)
    params = 12_000_347_800_000  # 100 layers of 12 * d_model**2 weights, and a little more
    assert f"{params:,} parameters" in message and "192 TB" in message
    assert "RAM" in message and "model.d_model" in message
    memory, _ = device_memory(torch.device("cpu"))
    assert params * TRAINING_BYTES_PER_PARAM > memory


def test_a_small_model_fits():
    config = TrainConfig(**SMALL)
    fits = check_fits(config, "cpu")
    assert fits == {"params": count_params(config),
                    "bytes": count_params(config) * TRAINING_BYTES_PER_PARAM}


@pytest.mark.parametrize("positions", ["learned", "sinusoidal"])
def test_max_len_below_seq_len_is_refused_for_position_tables(positions):
    with pytest.raises(ValueError, match=r"model.max_len=64 is below seq_len=128"):
        TrainConfig(seq_len=128, model={"max_len": 64, "positions": positions})
    assert TrainConfig(seq_len=128, model={"max_len": 128, "positions": positions})


@pytest.mark.parametrize("positions", ["rope", "alibi", "none"])
def test_max_len_below_seq_len_is_fine_without_a_table(positions):
    TrainConfig(seq_len=128, model={"max_len": 64, "positions": positions})


def test_unknown_keys_go_through_the_shared_from_dict():
    with pytest.raises(ValueError, match=r"TrainConfig has no field\(s\) \['text_field'\]"):
        TrainConfig.from_dict({"text_field": "body"})


def test_text_key_reaches_the_jsonl_reader(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"body": f"line {i}\n" * 20}) + "\n" for i in range(3)))
    with pytest.raises(CorpusError, match="has no field 'text'.*set text_key"):
        load_corpus(TrainConfig(corpus=str(path)))
    corpus = load_corpus(TrainConfig(corpus=str(path), text_key="body", split="position"))
    assert corpus.train[0].text.startswith("line 0\n")
    with pytest.raises(ValueError, match="text_key"):
        TrainConfig(text_key="")


@pytest.mark.parametrize("bad", [(0.9, 0.1), (0.5, 0.5, 0.5), (1.0, 0.0, 0.0), (0.9, -0.1, 0.2),
                                 "0.9,0.05,0.05"])
def test_split_fractions_are_checked(bad):
    with pytest.raises(ValueError, match="split_fractions"):
        TrainConfig(split_fractions=bad)


def test_split_keys_round_trip():
    config = TrainConfig.from_dict({"split": "position", "split_fractions": [0.8, 0.1, 0.1]})
    assert config.split_fractions == (0.8, 0.1, 0.1)
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="split must be one of"):
        TrainConfig(split="random")


def test_one_file_trains(tmp_path):
    (tmp_path / "one.py").write_text("".join(f"x{i} = {i} * 2\n" for i in range(400)))
    data = prepare_data(TrainConfig(corpus=str(tmp_path / "one.py"), **SMALL))
    assert data.corpus.split == "position"
    assert all(len(data.streams[s]) > 17 for s in ("train", "validation", "test"))


def test_validation_message_names_the_split_and_helps(tmp_path):
    (tmp_path / "one.py").write_text("".join(f"x{i} = {i}\n" for i in range(40)))
    config = TrainConfig(corpus=str(tmp_path / "one.py"), **{**SMALL, "seq_len": 64,
                                                            "batch_size": 1})
    with pytest.raises(CorpusError) as e:
        prepare_data(config)
    message = str(e.value)
    assert "validation split has" in message and "by position, 90/5/5" in message
    assert "split_fractions" in message and "lower seq_len to" in message
    folder = tmp_path / "few"
    folder.mkdir()
    (folder / "a.py").write_text("a = 1\n" * 200)
    config = TrainConfig(corpus=str(folder), split="document", **SMALL)
    with pytest.raises(CorpusError, match='split = "position"') as e:
        prepare_data(config)
    assert "by document" in str(e.value) and "seq_len" not in str(e.value)


def test_describe_names_the_split(tmp_path):
    (tmp_path / "one.py").write_text("".join(f"x{i} = {i} * 2\n" for i in range(400)))
    data = prepare_data(TrainConfig(corpus=str(tmp_path / "one.py"), **SMALL))
    assert data.describe().startswith("train: 1 files, ")
    assert data.describe().endswith("(split by position, 90/5/5)")


def test_gpu_memory_is_the_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 * 10**9, 80 * 10**9))
    memory, text = device_memory(torch.device("cuda", 0))
    assert memory == 3 * 10**9 and text == "cuda:0 has 3 GB free of 80 GB"
