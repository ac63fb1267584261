# The two commands of the README: `make demo` and `make test` (and `make lint`, `make docs`). All create .venv when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1
export NO_MKDOCS_2_WARNING := 1
DEMO_OUT ?= demo_out
# demo training length (epochs of 128 steps of 16 crops of 64 px, recipe=no_harm) and the degradation seed of the
# demo's Stage 1 stand-ins (training draws its degradations from seed 0)
DEMO_EPOCHS ?= 8
DEMO_SEED ?= 2024

.PHONY: install lint test docs demo bench clean

$(VENV)/.stage2-installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.stage2-installed

lint: install
	$(PY) -m ruff check .

test: install
	$(PY) -m pytest -q tests

# The manual (mkdocs-material, from the dev extra) into site/. --strict: a broken link or anchor fails the build.
docs: install
	$(PY) -m mkdocs build --strict -d site

# The demo: train a small refiner on examples/train_optical (simulated Stage 1 inputs, recipe=no_harm;
# about 3.7 min on 2 CPU cores, capped at 10), turn the held-back tiles of examples/demo_aoi into Stage 1 stand-ins
# with another degradation seed, refine them, report, and compare input and output with the truth.
demo: install
	rm -rf $(DEMO_OUT)/train $(DEMO_OUT)/stage1
	$(PY) -m stage2.train hardware=cpu precision=32 recipe=no_harm optical_dir=examples/train_optical seed=0 \
		trainer.max_epochs=$(DEMO_EPOCHS) trainer.max_time=00:00:10:00 \
		hydra.run.dir=$(DEMO_OUT)/train output_checkpoint=$(DEMO_OUT)/refiner.pt
	$(PY) -m stage2.degrade truth_dir=examples/demo_aoi output_dir=$(DEMO_OUT)/stage1 seed=$(DEMO_SEED)
	$(PY) -m stage2.predict hardware=cpu checkpoint=$(DEMO_OUT)/refiner.pt \
		input_dir=$(DEMO_OUT)/stage1 output_dir=$(DEMO_OUT)/opt_v2 skip_existing=false
	$(PY) -m stage2.report input_dir=$(DEMO_OUT)/stage1 output_dir=$(DEMO_OUT)/opt_v2
	$(PY) -m stage2.evaluate truth_dir=examples/demo_aoi input_dir=$(DEMO_OUT)/stage1 output_dir=$(DEMO_OUT)/opt_v2

bench: install
	$(PY) benchmarks/bench_predict.py

clean:
	rm -rf $(DEMO_OUT) outputs multirun .pytest_cache site
