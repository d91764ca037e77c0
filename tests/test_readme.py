"""Every ```python block of README.md runs, in order, in one namespace per block."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "__readme__"})


def test_readme_context_parallel_script_runs_under_torchrun(tmp_path):
    """The script the README writes with a heredoc runs on 2 gloo processes and prints a
    difference of rounding size from single-process attention."""
    import subprocess
    import sys

    text = README.read_text(encoding="utf-8")
    script = re.search(r"cat > cp_demo\.py <<'PY'\n(.*?)\nPY\n", text, flags=re.S).group(1)
    (tmp_path / "cp_demo.py").write_text(script + "\n")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         "--nproc_per_node", "2",
         "cp_demo.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    difference = float(re.search(r"tensor\(([-+.e\d]+)\)", run.stdout).group(1))
    assert difference < 1e-5
