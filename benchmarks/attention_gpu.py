"""GPU attention sweep: qkv's triton backend beside torch SDPA's flash, cuDNN and efficient
kernels, in one process (FlashAttention's sweep, plus decode bandwidth).

    PYTHONPATH=. python3 benchmarks/attention_gpu.py --out OUT [--quick]

Same as `qkv bench --device cuda`; the logic lives in qkv/bench/gpu.py.
"""

from qkv.bench.gpu import main

if __name__ == "__main__":
    main()
