"""all-MiniLM-L6-v2 exported with torch.onnx (dynamo) and run by ONNX Runtime agrees with qkv's
encoder: the comparison benchmarks/encoder_onnx_cpu.py times is a comparison of equals."""

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("onnx")
pytest.importorskip("transformers")

TOL = 1e-5


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "encoder_onnx_cpu.py"
    spec = importlib.util.spec_from_file_location("encoder_onnx_cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def session(request, bench, tmp_path_factory):
    """eager: matmul-softmax-matmul attention; sdpa: ONNX's Attention operator (opset 23)."""
    path = tmp_path_factory.mktemp("onnx") / f"minilm-{request.param}.onnx"
    return bench.ort_session(bench.export_onnx(path, attention=request.param), threads=1)


@pytest.mark.slow  # each export takes ~15 s
def test_onnx_runtime_matches_qkv(bench, session, minilm, texts):
    """Texts of 2 to 256 tokens in sorted batches of 8 (each padded to its longest), and one
    batch of a long and a short text, against qkv's packed encoder."""
    ids = minilm.tokenize(texts)
    assert min(map(len, ids)) == 2 and max(map(len, ids)) == 256
    ours = minilm.encode_ids(ids, batch_size=8)
    theirs = bench.ort_encode(session, ids, batch_size=8)
    assert theirs.shape == ours.shape == (len(texts), 384)
    diff = (theirs.double() - ours.double()).abs().max().item()
    assert diff < TOL, f"max abs diff {diff:.2e}"

    rows = [ids[22], ids[4]]  # ~200 tokens and 8: the short one is mostly padding
    input_ids, mask = bench.padded(rows)
    assert mask[1].sum() == len(ids[4]) < mask.shape[1]
    out = session.run(["sentence_embedding"], {"input_ids": input_ids.numpy(),
                                               "attention_mask": mask.numpy()})[0]
    want = torch.stack([ours[22], ours[4]]).double()
    assert (torch.from_numpy(out).double() - want).abs().max().item() < TOL
