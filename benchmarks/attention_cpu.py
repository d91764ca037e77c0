"""CPU attention benchmark: reference and chunked beside torch SDPA ("sdpa"), time and peak memory.

    python benchmarks/attention_cpu.py            # n = 1k ... 16k (about 15 minutes on 2 cores)
    python benchmarks/attention_cpu.py --quick    # n = 512, 1024
    python benchmarks/attention_cpu.py --no-memory   # times only, every case in this process

Same as `qkv bench --device cpu`; the logic lives in qkv/bench/cpu.py.
"""

import sys

from qkv.cli.main import app

if __name__ == "__main__":
    app(["bench", "--device", "cpu", *sys.argv[1:]])
