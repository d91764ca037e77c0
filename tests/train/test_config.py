import pytest

from qkv.train import TrainConfig, lr_at, parse_assignments
from qkv.train.config import merge


def test_unknown_key_names_it_and_lists_the_valid_ones():
    with pytest.raises(ValueError) as e:
        TrainConfig.from_dict({"max_step": 10})
    message = str(e.value)
    assert "max_step" in message and "max_steps" in message and "batch_size" in message


def test_unknown_model_key_is_named():
    with pytest.raises(ValueError, match="d_modle"):
        TrainConfig.from_dict({"model": {"d_modle": 64}})


@pytest.mark.parametrize("values, field", [
    ({"precision": "fp8"}, "precision"), ({"batch_size": 0}, "batch_size"),
    ({"lr": -1.0}, "lr"), ({"min_lr": 1.0, "lr": 0.1}, "min_lr"),
    ({"model": {"vocab_size": 10}}, "vocab_size"), ({"tokenizer": "word"}, "tokenizer"),
    ({"seed": 2**63}, r"seed must be an int in \[0, 2\*\*63-1\]"), ({"seed": -1}, "seed"),
])
def test_bad_values_are_rejected_by_name(values, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig.from_dict(values)


def test_toml_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('max_steps = 7\nlr = 1e-3\n[model]\nd_model = 64\nn_heads = 2\n')
    cfg = TrainConfig.from_toml(path, merge({}, parse_assignments(
        ["lr=5e-4", "model.n_layers=3", "corpus=some/folder"])))
    assert (cfg.max_steps, cfg.lr, cfg.corpus) == (7, 5e-4, "some/folder")
    assert cfg.model == {"d_model": 64, "n_heads": 2, "n_layers": 3}
    model = cfg.model_config(vocab_size=300)
    assert (model.d_model, model.n_layers, model.vocab_size, model.max_len) == (64, 3, 300, 128)


def test_toml_with_unknown_key(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("learning_rate = 1e-3\n")
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_toml(path)


def test_schedule_warmup_then_cosine_to_the_floor():
    kw = {"lr": 1.0, "min_lr": 0.1, "warmup_steps": 4, "max_steps": 13}
    lrs = [lr_at(s, **kw) for s in range(16)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[8] == pytest.approx(0.55)  # halfway down the cosine
    assert lrs[12] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert lr_at(0, lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=3) == pytest.approx(1.0)


def test_device_accepts_a_cuda_index_and_names_bad_values():
    from qkv.train.config import TrainConfig

    assert TrainConfig(device="cuda:1").device == "cuda:1"
    for bad in ("gpu", "cuda:", "cuda:x", 0):
        with pytest.raises(ValueError, match="device must be one of"):
            TrainConfig(device=bad)


@pytest.mark.parametrize("values, words", [
    ({"suffixes": 5}, "suffixes must be a list of strings"),
    ({"suffixes": {".py": 1}}, "suffixes must be a list of strings"),
    ({"model": 3}, "model must be a table"),
    ({"model": [1]}, "model must be a table"),
    ({"progress": 1}, "progress must be true or false"),
    ({"activation_checkpointing": "yes"}, "activation_checkpointing must be true or false"),
    ({"split_fractions": [float("nan"), 0.5, 0.5]}, "split_fractions must be three numbers"),
])
def test_a_value_of_the_wrong_type_is_a_value_error_naming_the_key(values, words):
    with pytest.raises(ValueError, match=words):
        TrainConfig.from_dict(values)


@pytest.mark.parametrize("base, overrides", [({"model": 3}, {}), ({}, {"model": 3}),
                                             ({"model": {"d_model": 8}}, {"model": "big"})])
def test_merging_a_model_that_is_not_a_table_names_it(base, overrides):
    with pytest.raises(ValueError, match=r"model must be a table .*--set model.KEY=VALUE"):
        merge(base, overrides)


def test_every_field_refuses_values_of_the_wrong_type_by_name():
    import dataclasses

    for field in dataclasses.fields(TrainConfig):
        for value in (5, "x", [1], {"a": 1}, 1.5, [["a"]]):
            try:
                TrainConfig.from_dict({field.name: value})
            except ValueError as e:
                assert field.name in str(e)
