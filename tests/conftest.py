"""Suite-wide setup.

Without a GPU, Triton kernels run in Triton's interpreter on the CPU. The variable must be set
before anything imports triton; importing torch does not.
"""

import logging
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests run two workers on two cores (pytest -n 2): one torch thread each avoids
# oversubscription, which makes the many tiny tensor ops of the suite many times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# torch.compile's structured trace log is DEBUG and propagates to pytest's log capture, which
# then formats every record (whole graphs): compiles would run several times slower.
logging.getLogger("torch.__trace").propagate = False


@pytest.fixture
def crash_at_call(monkeypatch):
    """`install(module, names, step)`: the (step + 1)-th call among `module`'s functions `names`
    raises OSError, as a disk failing at that step would; returns the list of the names called,
    in order. `monkeypatch.undo()` puts the real functions back."""

    def install(module, names, step):
        calls = []

        def crashing(real):
            def wrapper(*args, **kwargs):
                calls.append(real.__name__)
                if len(calls) == step + 1:
                    raise OSError(5, "the disk went away")
                return real(*args, **kwargs)
            return wrapper

        for name in names:
            monkeypatch.setattr(module, name, crashing(getattr(module, name)))
        return calls

    return install
