"""TrainConfig: every setting of a training run, validated loudly, loadable from TOML."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qkv.data.corpus import SPLIT_MODES
from qkv.data.proteins import is_protein_source
from qkv.data.residues import RESIDUE_VOCAB_SIZE
from qkv.device import resolve_device
from qkv.nn import TransformerConfig
from qkv.nn.config import check_choice, check_float, check_int, from_dict
from qkv.units import format_bytes

PRECISIONS = ("fp32", "bf16", "fp16")
TOKENIZERS = ("bpe", "byte", "residue")
DEVICES = ("auto", "cpu", "cuda")
MAX_SEED = 2**63 - 1  # what a 64-bit signed int holds (TOML, torch generators)

_MODEL_NOT_A_TABLE = ("model must be a table of TransformerConfig fields (a [model] table in "
                      "the TOML file, or --set model.KEY=VALUE), got {}")

# The default small DecoderLM: about 1M parameters with a 2048-token vocabulary.
DEFAULT_MODEL = {"d_model": 128, "n_layers": 4, "n_heads": 4, "positions": "learned"}


@dataclass
class TrainConfig:
    """Settings of one training run of a DecoderLM on a text corpus.

    Data: `corpus` is "stdlib", a folder, a glob or a .jsonl file (see qkv.data.CorpusConfig);
    the tokenizer is trained on the training split only. Model: `model` holds TransformerConfig
    fields (vocab_size comes from the tokenizer; max_len defaults to seq_len) over DEFAULT_MODEL.
    One optimizer step sees batch_size * grad_accum * world_size / context_parallel windows of
    seq_len tokens: the processes of a context-parallel group share each window.

    Protein corpora ("proteins" or a FASTA file, qkv.data.proteins) train on whole sequences
    batched by length (qkv.data.LengthBucketSampler): a micro-batch holds at most batch_size
    sequences and max_tokens padded tokens, and seq_len is the longest input (a longer sequence
    is cut into pieces of seq_len); their tokenizer is "residue" ("bpe", the default, means
    "residue" there), or "byte".
    """

    # data
    corpus: str = "stdlib"
    suffixes: tuple[str, ...] | None = None  # folders and globs: keep these file suffixes
    text_key: str = "text"  # .jsonl corpora: the field that holds each record's text
    split: str = "auto"  # auto | document | position (see qkv.data.CorpusConfig)
    split_fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)  # train, validation, test
    max_bytes: int | None = 3_000_000
    max_files: int | None = None
    tokenizer: str = "bpe"  # bpe | byte | residue (protein corpora)
    vocab_size: int = 2048  # BPE only
    seq_len: int = 128
    max_tokens: int | None = None  # protein corpora: padded tokens a micro-batch holds at most
    # model
    model: dict[str, Any] = field(default_factory=dict)
    # optimisation
    batch_size: int = 16  # windows per micro-batch per process
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float | None = 1.0  # max global grad norm; None: no clipping
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + GradScaler, CUDA only)
    activation_checkpointing: bool = False
    # evaluation, logging, checkpoints
    eval_interval: int = 250  # steps between validation runs (and one at the end)
    eval_batches: int | None = 20  # validation batches per run; None: the whole split
    log_interval: int = 10  # steps between metric records in metrics.jsonl
    checkpoint_interval: int = 250  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3
    out_dir: str = "runs/train"
    time_limit: float | None = None  # seconds of training in this session; then save and stop
    # machine
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # torch CPU threads; None: torch's default
    progress: bool = True  # a live progress bar on rank 0
    # processes that share each sequence (qkv.distributed); the rest of the world is data
    # parallel: world size = data parallel × context_parallel
    context_parallel: int = 1

    def __post_init__(self):
        if not isinstance(self.corpus, str) or not self.corpus:
            raise ValueError(f"corpus must be a non-empty string, got {self.corpus!r}")
        if self.suffixes is not None:
            if not isinstance(self.suffixes, (list, tuple)) or not all(isinstance(s, str)
                                                                       for s in self.suffixes):
                raise ValueError(f"suffixes must be a list of strings such as [\".py\"], got "
                                 f"{self.suffixes!r}")
            self.suffixes = tuple(self.suffixes)
        if not isinstance(self.text_key, str) or not self.text_key:
            raise ValueError(f"text_key must be a non-empty string, got {self.text_key!r}")
        check_choice("split", self.split, SPLIT_MODES)
        self.split_fractions = _check_split_fractions(self.split_fractions)
        check_int("max_bytes", self.max_bytes, optional=True)
        check_int("max_files", self.max_files, optional=True)
        check_choice("tokenizer", self.tokenizer, TOKENIZERS)
        self._check_protein_settings()
        check_int("vocab_size", self.vocab_size, minimum=258)
        check_int("seq_len", self.seq_len, minimum=2)
        check_int("max_tokens", self.max_tokens, optional=True)
        if not isinstance(self.model, dict):
            raise ValueError(_MODEL_NOT_A_TABLE.format(type(self.model).__name__))
        if "vocab_size" in self.model:
            raise ValueError("model.vocab_size comes from the tokenizer; set vocab_size instead")
        model = self.model_config(vocab_size=self.vocab_size)  # validates the model table
        if model.positions in ("learned", "sinusoidal") and model.max_len < self.seq_len:
            raise ValueError(f"model.max_len={model.max_len} is below seq_len={self.seq_len}: "
                             f"the {model.positions} position table must cover a training "
                             f"window; raise model.max_len to at least {self.seq_len} or leave "
                             f"it unset (it defaults to seq_len)")
        for name in ("batch_size", "grad_accum", "max_steps", "log_interval", "eval_interval",
                     "checkpoint_interval", "keep_checkpoints"):
            check_int(name, getattr(self, name))
        check_int("eval_batches", self.eval_batches, optional=True)
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        check_int("seed", self.seed, minimum=0)
        if self.seed > MAX_SEED:
            raise ValueError(f"seed must be an int in [0, 2**63-1], got {self.seed!r}")
        check_int("threads", self.threads, optional=True)
        check_float("lr", self.lr, low=0.0, low_open=True)
        check_float("min_lr", self.min_lr, low=0.0, high=self.lr, high_open=False)
        check_float("weight_decay", self.weight_decay, low=0.0)
        check_float("beta1", self.beta1, low=0.0, high=1.0)
        check_float("beta2", self.beta2, low=0.0, high=1.0)
        check_float("grad_clip", self.grad_clip, low=0.0, low_open=True, optional=True)
        check_float("time_limit", self.time_limit, low=0.0, low_open=True, optional=True)
        check_choice("precision", self.precision, PRECISIONS)
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?",
                                                                  self.device):
            raise ValueError(f"device must be one of {list(DEVICES)} or 'cuda:N', "
                             f"got {self.device!r}")
        for name in ("activation_checkpointing", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise ValueError(f"out_dir must be a non-empty path, got {self.out_dir!r}")
        check_int("context_parallel", self.context_parallel)
        if self.context_parallel > 1:
            self._check_context_parallel(model)

    def _check_context_parallel(self, model: TransformerConfig) -> None:
        """A model and windows that context-parallel training can shard (zigzag: 2 chunks of
        every window per process)."""
        from qkv.distributed.lm import check_model

        check_model(model)
        multiple = 2 * self.context_parallel
        if not is_protein_source(self.corpus) and self.seq_len % multiple:
            raise ValueError(f"seq_len={self.seq_len} must be divisible by 2 × "
                             f"context_parallel = {multiple}: each window is cut into 2 "
                             f"chunks per process (zigzag)")

    def _check_protein_settings(self) -> None:
        """The tokenizer and split a protein corpus takes (and a text corpus refuses)."""
        if not is_protein_source(self.corpus):
            if self.tokenizer == "residue":
                raise ValueError(f"tokenizer 'residue' is for protein corpora ('proteins' or a "
                                 f".fa/.fasta/.faa file, .gz too), not {self.corpus!r}")
            return
        if self.tokenizer == "bpe":
            self.tokenizer = "residue"
        if self.split == "position":
            raise ValueError("split must be 'document' or 'auto' for a protein corpus: "
                             "'position' would cut every sequence apart")

    def model_config(self, vocab_size: int) -> TransformerConfig:
        """The TransformerConfig of the model: DEFAULT_MODEL, then `model`, then vocab_size."""
        values = {**DEFAULT_MODEL, "max_len": self.seq_len, **self.model,
                  "vocab_size": vocab_size}
        try:
            return TransformerConfig.from_dict(values)
        except ValueError as e:
            raise ValueError(f"[model] table: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain TOML/JSON values (tuples become lists)."""
        values = dataclasses.asdict(self)
        if values["suffixes"] is not None:
            values["suffixes"] = list(values["suffixes"])
        values["split_fractions"] = list(values["split_fractions"])
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict; an unknown key raises ValueError naming it and the valid ones (the
        [model] table's keys are checked against TransformerConfig the same way)."""
        return from_dict(cls, values)

    @classmethod
    def from_toml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Read a TOML file (top-level keys are fields; a [model] table holds the model), then
        apply `overrides` (a `model` entry is merged into the file's [model] table)."""
        values = load_toml(path)
        return cls.from_dict(merge(values, overrides or {}))


# fp32 weights (4 bytes), their gradients (4) and AdamW's two moments (8); autocast keeps fp32
# weights too. Activations come on top and depend on batch_size and seq_len.
TRAINING_BYTES_PER_PARAM = 16


def largest_vocab(config: TrainConfig) -> int:
    """The largest vocabulary `config`'s tokenizer can give: vocab_size for BPE, 258 for bytes,
    29 for residues."""
    return {"bpe": config.vocab_size, "byte": 258, "residue": RESIDUE_VOCAB_SIZE}[config.tokenizer]


def count_params(config: TrainConfig, vocab_size: int | None = None) -> int:
    """Parameters of the DecoderLM that `config` trains, counted on the meta device (nothing is
    allocated). vocab_size defaults to largest_vocab(config)."""
    from qkv.nn import DecoderLM

    if vocab_size is None:
        vocab_size = largest_vocab(config)
    with torch.device("meta"):
        return DecoderLM(config.model_config(vocab_size)).num_params()


def device_memory(device: torch.device) -> tuple[int, str] | None:
    """(bytes, description) of the memory a model on `device` can use: free memory on a GPU, the
    total RAM for the CPU; None where it cannot be told."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free, f"{device} has {format_bytes(free)} free of {format_bytes(total)}"
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
        return total, f"this machine has {format_bytes(total)} of RAM"
    return None


def check_fits(config: TrainConfig, device: str | torch.device | None = None) -> dict[str, int]:
    """Refuse a model whose weights, gradients and AdamW state alone exceed the device's memory,
    before anything is allocated. device defaults to config.device.

    Returns {"params", "bytes"} (bytes = params * TRAINING_BYTES_PER_PARAM). Raises ValueError
    naming the parameter count, the bytes needed and the memory the device has.
    """
    device = resolve_device(config.device if device is None else device)
    params = count_params(config)
    needed = params * TRAINING_BYTES_PER_PARAM
    memory = device_memory(device)
    if memory is not None and needed > memory[0]:
        raise ValueError(f"the model does not fit: {params:,} parameters need "
                         f"{format_bytes(needed)} for fp32 weights, gradients and AdamW state "
                         f"({TRAINING_BYTES_PER_PARAM} bytes each, before activations), but "
                         f"{memory[1]}; make it smaller (model.d_model, model.n_layers, "
                         f"vocab_size)")
    return {"params": params, "bytes": needed}


def _check_split_fractions(value: Any) -> tuple[float, float, float]:
    """`value` as a (train, validation, test) tuple; ValueError unless it is three numbers >= 0
    that sum to 1, with train and validation > 0."""
    numbers = (isinstance(value, (list, tuple)) and len(value) == 3
               and all(isinstance(f, (int, float)) and not isinstance(f, bool)
                       and math.isfinite(f) for f in value))
    if (not numbers or min(value) < 0 or abs(sum(value) - 1) > 1e-9 or value[0] <= 0
            or value[1] <= 0):
        raise ValueError(f"split_fractions must be three numbers [train, validation, test] "
                         f"that sum to 1, with train and validation > 0, got {value!r}")
    return tuple(float(f) for f in value)


def load_toml(path: str | Path) -> dict[str, Any]:
    """The table in a TOML file; FileNotFoundError or ValueError (naming the file) if unusable."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config file {path} is a folder, not a file; give a TOML file")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {path} is not valid TOML: {e}") from None


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` updated by `overrides`; the `model` tables are merged key by key. A `model` that
    is not a table raises ValueError."""
    merged = {**base, **overrides}
    if "model" in base or "model" in overrides:
        tables = (base.get("model", {}), overrides.get("model", {}))
        for table in tables:
            if not isinstance(table, dict):
                raise ValueError(_MODEL_NOT_A_TABLE.format(type(table).__name__))
        merged["model"] = {**tables[0], **tables[1]}
    return merged


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """Overrides from "key=value" strings; the value is read as TOML (a bare word is a string)
    and "model.key=value" sets a model field."""
    result: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        if key.startswith("model."):
            result.setdefault("model", {})[key.removeprefix("model.")] = value
        else:
            result[key] = value
    return result
