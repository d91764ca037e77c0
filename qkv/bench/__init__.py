"""Benchmarks that `qkv bench` runs: CPU (`qkv.bench.cpu`) and CUDA (`qkv.bench.gpu`)."""
