"""Suite-wide setup.

Without a GPU, Triton kernels run in Triton's interpreter on the CPU. The variable must be set
before anything imports triton; importing torch does not.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
