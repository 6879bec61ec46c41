# defocus-clip: the commands a user needs. `make install`, `make test`, `make pretrain`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/defocus-clip
RECIPE ?= demo
NPROC ?= $(shell $(PY) -c "import torch; print(max(torch.cuda.device_count(), 1))" 2>/dev/null || echo 1)
ARGS ?=

.PHONY: install check-disk test lint bench pretrain demo-data eval clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(PY):
	$(PYTHON) -m venv $(VENV)

install: check-disk $(PY)  ## create .venv and install the project (editable) with its test extras
	$(PY) -m pip install -q -e '.[test]' 2>&1 | grep -v "^WARNING: Location"; test $${PIPESTATUS[0]:-0} -eq 0
	$(PY) -c "import defocus_clip, torchvision, open_clip, deepspeed; print('defocus-clip', defocus_clip.__version__, 'installed')"
	$(PY) -c "from defocus_clip.layers import scan_cpu; print('fused CPU kernel:', 'ready' if scan_cpu.available() else 'unavailable, the pure-PyTorch scan will run')"

# The venv takes ~6.5 GB, 5.6 of them torch's CUDA build and its NVIDIA libraries (the CPU-only torch breaks
# torchvision). A disk that fills up mid-install leaves pip's "[Errno 28] No space left on device" and a half-written
# venv; this says so before anything is written, unless torch is installed already.
INSTALL_GB ?= 7
check-disk:  ## fail early, saying why, when the disk for the venv cannot take the install
	@d='$(abspath $(VENV))'; while [ ! -d "$$d" ]; do d=$$(dirname "$$d"); done; \
	free=$$(df -Pk "$$d" | awk 'NR == 2 {print int($$4 / 1048576)}'); \
	if ! $(PY) -c 'import torch' >/dev/null 2>&1 && [ "$$free" -lt $(INSTALL_GB) ]; then \
	  echo "make install: $(VENV) needs about $(INSTALL_GB) GB of free disk (torch's CUDA build alone is 5.6 GB)," \
	    "but the disk that holds $$d has $$free GB free. Free some space, or install elsewhere:" \
	    "make install VENV=/path/on/a/larger/disk/.venv" >&2; \
	  exit 1; \
	fi

test:  ## run the test suite (CPU, offline)
	$(PY) -m ruff check src tests recipes data_prep eval
	$(PY) -m pytest -q -ra $(ARGS)

lint:  ## ruff
	$(PY) -m ruff check src tests recipes data_prep eval

bench:  ## throughput and peak memory against OpenCLIP's ViT-B-32, printed as ratios
	$(CLI) bench $(ARGS)

demo-data:  ## build the embedded Twemoji demo data set (training shards + clip-benchmark wds/ sets)
	$(CLI) prep demo $(ARGS)

pretrain:  ## train RECIPE (default: demo, a small model on the demo data, CPU, minutes)
	$(CLI) train --recipe $(RECIPE) --nproc $(NPROC) $(ARGS)

DATA ?= demo
EVAL_OUT ?= results/eval/$(notdir $(patsubst %/,%,$(CKPT)))
eval:  ## zero-shot evaluation: make eval CKPT=run_dir_or_file DATA=imagenet1k,mscoco_captions [ROOT='/data/{dataset}']
	$(CLI) eval --checkpoint $(CKPT) --dataset $(subst $(comma), ,$(DATA)) $(if $(ROOT),--dataset-root '$(ROOT)') \
		--output $(EVAL_OUT) $(ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache

comma := ,
SHELL := /bin/bash
