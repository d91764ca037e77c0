"""GPU attention sweep: qkv's triton backend beside torch SDPA's flash, cuDNN and efficient
kernels, in one process (FlashAttention's sweep, plus decode bandwidth).

    PYTHONPATH=. python3 benchmarks/attention_gpu.py --out OUT [--quick] [--n N] [--reps R]

This is `qkv bench --device cuda` with the same options; the sweep lives in qkv/bench/gpu.py.
"""

import sys

from qkv.cli.main import app

if __name__ == "__main__":
    app(["bench", "--device", "cuda", *sys.argv[1:]], prog_name="attention_gpu.py")
