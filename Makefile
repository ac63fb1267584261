# The two commands of the README: `make demo` and `make test`. Both create .venv when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1
DEMO_OUT ?= demo_out

.PHONY: install test demo bench clean

$(VENV)/.stage2-installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.stage2-installed

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) scripts/make_demo_checkpoint.py $(DEMO_OUT)/checkpoint.pt
	$(PY) -m stage2.predict hardware=cpu checkpoint=$(DEMO_OUT)/checkpoint.pt \
		input_dir=examples/demo_aoi output_dir=$(DEMO_OUT)/opt_v2 skip_existing=false
	$(PY) -m stage2.report input_dir=examples/demo_aoi output_dir=$(DEMO_OUT)/opt_v2

bench: install
	$(PY) benchmarks/bench_predict.py

clean:
	rm -rf $(DEMO_OUT) outputs multirun .pytest_cache
