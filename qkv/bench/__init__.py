"""Benchmarks that `qkv bench` runs: CPU (`qkv.bench.cpu`) and CUDA (`qkv.bench.gpu`).

The sweeps' names and default sizes live here, where reading them does not import torch.
"""

CPU_BACKENDS = ("sdpa", "chunked", "reference")  # sdpa: torch's F.scaled_dot_product_attention
CPU_SEQLENS = (1024, 2048, 4096, 8192, 16384)
CPU_QUICK_SEQLENS = (512, 1024)
CPU_REPS = 3  # timed runs per case; the median is kept

# The GPU sweep's providers: qkv's triton backend, and torch SDPA held to one kernel each.
SDPA_PROVIDERS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                  "sdpa-efficient": "EFFICIENT_ATTENTION"}
GPU_PROVIDERS = ("qkv-triton", *SDPA_PROVIDERS)
GPU_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
GPU_QUICK_SEQLENS = (1024, 4096)
GPU_REPS = 1  # do_bench calls per point (each a median over ~40 ms); the median is kept
