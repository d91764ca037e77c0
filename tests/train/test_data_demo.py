"""The demo's settings and its up-front checks (the demo itself runs in tests/cli)."""

import pytest

import qkv.train.demo as demo
from qkv.train.demo import DEMO, QUICK, demo_config


def test_quick_is_the_demo_made_smaller():
    assert set(QUICK) == set(DEMO)
    quick, full = demo_config(quick=True), demo_config()
    assert quick.max_steps < full.max_steps and quick.max_bytes < full.max_bytes
    assert (quick.corpus, quick.tokenizer) == (full.corpus, full.tokenizer)


def test_unwritable_out_dir_is_refused_before_any_work(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the output folder was checked")

    monkeypatch.setattr(demo, "load_corpus", no_work)
    monkeypatch.setattr(demo, "fastest_thread_count", no_work)
    with pytest.raises(OSError, match=f"cannot write to the run folder {blocker / 'demo'}"):
        demo.run_demo(quick=True, out_dir=str(blocker / "demo"))
