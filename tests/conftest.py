"""Suite-wide setup.

Without a GPU, Triton kernels run in Triton's interpreter on the CPU. The variable must be set
before anything imports triton; importing torch does not.
"""

import logging
import os

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
