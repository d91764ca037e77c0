"""TrainConfig: every setting of a training run, validated loudly, loadable from TOML."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkv.nn import TransformerConfig
from qkv.nn.config import check_choice, check_float, check_int

PRECISIONS = ("fp32", "bf16", "fp16")
TOKENIZERS = ("bpe", "byte")
DEVICES = ("auto", "cpu", "cuda")

# The default small DecoderLM: about 1M parameters with a 2048-token vocabulary.
DEFAULT_MODEL = {"d_model": 128, "n_layers": 4, "n_heads": 4, "positions": "learned"}


@dataclass
class TrainConfig:
    """Settings of one training run of a DecoderLM on a text corpus.

    Data: `corpus` is "stdlib", a folder, a glob or a .jsonl file (see qkv.data.CorpusConfig);
    the tokenizer is trained on the training split only. Model: `model` holds TransformerConfig
    fields (vocab_size comes from the tokenizer; max_len defaults to seq_len) over DEFAULT_MODEL.
    One optimizer step sees batch_size * grad_accum * world_size windows of seq_len tokens.
    """

    # data
    corpus: str = "stdlib"
    suffixes: tuple[str, ...] | None = None  # folders and globs: keep these file suffixes
    max_bytes: int | None = 3_000_000
    max_files: int | None = None
    tokenizer: str = "bpe"  # bpe | byte
    vocab_size: int = 2048  # BPE only
    seq_len: int = 128
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

    def __post_init__(self):
        if not isinstance(self.corpus, str) or not self.corpus:
            raise ValueError(f"corpus must be a non-empty string, got {self.corpus!r}")
        if self.suffixes is not None:
            if isinstance(self.suffixes, str) or not all(isinstance(s, str)
                                                          for s in self.suffixes):
                raise ValueError(f"suffixes must be a list of strings, got {self.suffixes!r}")
            self.suffixes = tuple(self.suffixes)
        check_int("max_bytes", self.max_bytes, optional=True)
        check_int("max_files", self.max_files, optional=True)
        check_choice("tokenizer", self.tokenizer, TOKENIZERS)
        check_int("vocab_size", self.vocab_size, minimum=258)
        check_int("seq_len", self.seq_len, minimum=2)
        if not isinstance(self.model, dict):
            raise ValueError(f"model must be a table of TransformerConfig fields, got "
                             f"{type(self.model).__name__}")
        if "vocab_size" in self.model:
            raise ValueError("model.vocab_size comes from the tokenizer; set vocab_size instead")
        self.model_config(vocab_size=self.vocab_size)  # validates the model table
        for name in ("batch_size", "grad_accum", "max_steps", "log_interval", "eval_interval",
                     "checkpoint_interval", "keep_checkpoints"):
            check_int(name, getattr(self, name))
        check_int("eval_batches", self.eval_batches, optional=True)
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        check_int("seed", self.seed, minimum=0)
        check_int("threads", self.threads, optional=True)
        check_float("lr", self.lr, low=0.0, low_open=True)
        check_float("min_lr", self.min_lr, low=0.0, high=self.lr, high_open=False)
        check_float("weight_decay", self.weight_decay, low=0.0)
        check_float("beta1", self.beta1, low=0.0, high=1.0)
        check_float("beta2", self.beta2, low=0.0, high=1.0)
        check_float("grad_clip", self.grad_clip, low=0.0, low_open=True, optional=True)
        check_float("time_limit", self.time_limit, low=0.0, low_open=True, optional=True)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("device", self.device, DEVICES)
        for name in ("activation_checkpointing", "progress"):
            check_choice(name, getattr(self, name), (True, False))
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise ValueError(f"out_dir must be a non-empty path, got {self.out_dir!r}")

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
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict; an unknown key raises ValueError naming it and the valid ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in values if k not in names]
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; valid keys: {', '.join(names)}")
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Read a TOML file (top-level keys are fields; a [model] table holds the model), then
        apply `overrides` (a `model` entry is merged into the file's [model] table)."""
        values = load_toml(path)
        return cls.from_dict(merge(values, overrides or {}))


def load_toml(path: str | Path) -> dict[str, Any]:
    """The table in a TOML file; FileNotFoundError or ValueError (naming the file) if unusable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {path} is not valid TOML: {e}") from None


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` updated by `overrides`; the `model` tables are merged key by key."""
    merged = {**base, **overrides}
    if "model" in base or "model" in overrides:
        merged["model"] = {**base.get("model", {}), **overrides.get("model", {})}
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
