import math

import pytest
import torch

from qkv.compare import ROW_NAMES, Settings, evaluate_task, fit, fmt, load_row, markdown_table
from qkv.nn import IGNORE_INDEX, DecoderLM, TransformerConfig


class _Data:
    def __init__(self, inputs, targets):
        self.inputs, self.targets = inputs, targets


def test_fmt_and_table():
    assert fmt(1.23456) == "1.23"
    assert fmt(1e-5) == "1.00e-05"
    assert fmt(None) == "—" and fmt(True) == "yes" and fmt(float("inf")) == "∞"
    table = markdown_table(["n", "time (s)"], [[256, 0.5], [512, 2.0]])
    assert table.splitlines() == ["| n | time (s) |", "|---|---|", "| 256 | 0.5 |",
                                  "| 512 | 2 |"]


def test_settings_longest():
    assert Settings().longest == 16384
    assert Settings(quick=True).longest == 1024
    assert Settings(max_len=300).longest == 300


def test_rows_depend_on_quick_and_seed_unless_they_say_otherwise():
    from qkv.compare import Row

    assert Row("x", "X", run=lambda ctx: None, minutes=1).depends_on == ("quick", "seed")
    for name in ("cost", "scale"):  # they seed a fixed 0
        assert load_row(name).depends_on == ("quick", "max_len", "memory_budget"), name
    with pytest.raises(ValueError, match="depends_on must name fields of Settings.*'speed'"):
        Row("x", "X", run=lambda ctx: None, minutes=1, depends_on=("quick", "speed"))


def test_unknown_row_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown row 'nope'.*cost"):
        load_row("nope")
    assert ROW_NAMES[0] == "cost"


def test_fit_learns_a_fixed_mapping_and_evaluate_task_scores_only_scored_positions():
    torch.manual_seed(0)
    model = DecoderLM(TransformerConfig(vocab_size=8, d_model=32, n_layers=1, n_heads=2,
                                        max_len=8))
    inputs = torch.randint(0, 8, (16, 8))
    targets = inputs.clone()  # copy the current token: learnable without context
    targets[:, ::2] = IGNORE_INDEX
    losses = fit(model, lambda step: (inputs, targets), steps=60, lr=1e-2)
    assert len(losses) == 60 and losses[-1] < losses[0] / 5
    result = evaluate_task(model, _Data(inputs, targets), batch_size=5)
    assert result["scored"] == 16 * 4 and result["accuracy"] == 1.0
    logits, _ = model(inputs)
    scored = targets != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[scored].double(), targets[scored])
    assert math.isclose(result["loss"], expected.item(), rel_tol=1e-6)


def test_fit_refuses_zero_steps():
    model = DecoderLM(TransformerConfig(vocab_size=8, d_model=16, n_layers=1, n_heads=2))
    with pytest.raises(ValueError, match="steps"):
        fit(model, lambda step: None, steps=0)
