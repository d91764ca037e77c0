"""Fault injection: a save killed at each of its disk operations in turn never leaves a run
without a loadable latest checkpoint, and the next start recovers or clears what it left."""

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from qkv.data import byte_tokenizer
from qkv.train import checkpoint as ckpt
from qkv.train import find_latest, list_checkpoints, load_model, train, verify
from qkv.train.loop import make_optimizer
from qkv.train.resume import load_training_state
from tests.train.conftest import tiny_config
from tests.train.test_checkpoint import _model, _trained_optimizer

# The disk operations of a save, in the modules where the save looks them up.
OPERATIONS = [(os, "replace"), (shutil, "rmtree"), (os, "fsync"), (tempfile, "mkstemp"),
              (ckpt, "save_file")]


class Killed(BaseException):
    """The process died here: neither this operation nor any later one touches the disk."""


def _stable(path) -> str:
    """A file's name without the random or PID parts of temporary names."""
    name = re.sub(r"^\.(.+)\.[^.]+\.tmp$", r"\1", Path(str(path)).name)
    return re.sub(r"\.(tmp|old|del)-[0-9-]+$", r".\1", name)


@contextlib.contextmanager
def dying_at(kill_at: int | None, labels: list[str] | None = None):
    """Run the body with the `kill_at`-th disk operation (0-based) and all after it failing."""
    state = {"done": 0, "dead": False}

    def wrap(function, name):
        def operation(*args, **kwargs):
            if state["dead"] or state["done"] == kill_at:
                state["dead"] = True
                raise Killed(name)
            state["done"] += 1
            if labels is not None:
                target = _stable(args[-1]) if name in ("replace", "save_file") else ""
                labels.append(f"{len(labels)}-{name}-{target}".rstrip("-"))
            return function(*args, **kwargs)
        return operation

    originals = [(module, name, getattr(module, name)) for module, name in OPERATIONS]
    for module, name, function in originals:
        setattr(module, name, wrap(function, name))
    try:
        yield
    finally:
        for module, name, function in originals:
            setattr(module, name, function)


MODEL = _model(seed=7)
OPTIMIZER = _trained_optimizer(MODEL)


def _save(run, step, keep=3):
    return ckpt.save_checkpoint(run, step, model=MODEL, tokenizer=byte_tokenizer(),
                                optimizer=OPTIMIZER, trainer_state={"data": {}}, keep=keep)


def _new_step(run) -> tuple[int, int]:
    """Steps 1 and 2 complete; saving step 3 (keep=2) also prunes step 1."""
    _save(run, 1)
    _save(run, 2)
    return 3, 2


def _replace_step(run) -> tuple[int, int]:
    """Step 1 complete and step 2 truncated: saving step 2 replaces the unusable one."""
    _save(run, 1)
    weights = _save(run, 2) / ckpt.MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    return 2, 3


SCENARIOS = {"new": _new_step, "replace": _replace_step}


def _operations(scenario) -> list[str]:
    """The labels of the disk operations of the scenario's save, from a run without faults."""
    with tempfile.TemporaryDirectory() as run:
        step, keep = SCENARIOS[scenario](run)
        labels: list[str] = []
        with dying_at(None, labels):
            _save(run, step, keep)
    return labels


_LABELS = {scenario: _operations(scenario) for scenario in SCENARIOS}
CASES = [(scenario, label) for scenario, labels in _LABELS.items() for label in labels]


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    """Each scenario's run folder before the save, built once."""
    made = {}
    for scenario, setup in SCENARIOS.items():
        folder = tmp_path_factory.mktemp(scenario)
        made[scenario] = (folder, *setup(folder))
    return made


@pytest.mark.parametrize(("scenario", "operation"), CASES, ids=[f"{s}:{o}" for s, o in CASES])
def test_save_killed_at_each_operation(tmp_path, baselines, scenario, operation):
    baseline, step, keep = baselines[scenario]
    shutil.copytree(baseline, tmp_path, dirs_exist_ok=True)
    kill_at = int(operation.split("-")[0])
    manifest_in = next(i for i, label in enumerate(_LABELS[scenario])
                       if label.endswith("replace-manifest.json"))
    with pytest.raises(Killed), dying_at(kill_at):
        _save(tmp_path, step, keep)

    ckpt.recover(tmp_path)  # what the next run does first, under the run's lock
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []
    latest = find_latest(tmp_path)
    assert latest is not None
    if kill_at > manifest_in:  # the new checkpoint was complete: it is the latest
        assert latest.name == f"step-{step:08d}"
    else:
        assert latest.name == f"step-{step - 1:08d}"
    load_model(tmp_path)
    load_training_state(latest, make_optimizer(_model(), tiny_config("unused")))
    for path in list_checkpoints(tmp_path):
        if path.name != f"step-{step:08d}" or scenario == "new":
            verify(path)  # nothing half pruned or half replaced is left under a step's name
    assert find_latest(tmp_path) == latest
    assert _save(tmp_path, step, keep).name == f"step-{step:08d}"  # and the next save works
    verify(find_latest(tmp_path))


# A resume through the training loop around a save cut short at the riskiest moments.
@pytest.mark.filterwarnings("ignore:.*(falling back|recovered).*:UserWarning")
@pytest.mark.parametrize("moment", ["replace-manifest.json", "replace-step-00000004",
                                    "rmtree"])
def test_resume_after_a_replacement_cut_short(tmp_path, tiny_data, moment):
    config = {"max_steps": 4, "checkpoint_interval": 2}
    straight = train(tiny_config(tmp_path / "straight", **config), data=tiny_data)
    run = tmp_path / "run"
    train(tiny_config(run, **config), data=tiny_data)
    weights = run / "checkpoints" / "step-00000004" / ckpt.MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:-8])  # resume falls back to step 2, saves 4 again

    real_save = ckpt.save_checkpoint
    labels: list[str] = []

    def learn_then_stop(*args, **kwargs):
        with dying_at(None, labels):
            real_save(*args, **kwargs)
        raise AssertionError("dry run")

    def killed_save(*args, **kwargs):
        kill_at = next(int(label.split("-")[0]) for label in labels if moment in label)
        with dying_at(kill_at):
            return real_save(*args, **kwargs)

    shutil.copytree(run, tmp_path / "dry")
    ckpt.save_checkpoint = learn_then_stop
    try:
        with pytest.raises(AssertionError, match="dry run"):
            train(tiny_config(tmp_path / "dry", **config), data=tiny_data, resume=True)
        ckpt.save_checkpoint = killed_save
        with pytest.raises(Killed):
            train(tiny_config(run, **config), data=tiny_data, resume=True)
    finally:
        ckpt.save_checkpoint = real_save
    resumed = train(tiny_config(run, **config), data=tiny_data, resume=True)
    assert resumed.step == 4 and resumed.checkpoint.name == "step-00000004"
    verify(resumed.checkpoint)
    for step in resumed.losses:
        assert resumed.losses[step] == pytest.approx(straight.losses[step], abs=1e-6)
    final, _, _ = load_model(run)
    expected, _, _ = load_model(tmp_path / "straight")
    for (name, a), b in zip(final.state_dict().items(), expected.state_dict().values(),
                            strict=True):
        assert (a - b).abs().max() <= 1e-6, name
