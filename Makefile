# The two commands: `make demo` runs the whole system, `make test` runs the whole suite.
# Both need only Python 3.11+ and pip: they create .venv and install from requirements.lock.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo test install lint lock check clean

$(INSTALLED): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.lock -e ".[dev,serving]"
	@touch $(INSTALLED)

install: $(INSTALLED)

demo: $(INSTALLED)
	$(PY) -m console.launcher

# DATABASE_URL / REDIS_URL when set; otherwise embedded servers under .demo/test, stopped afterwards.
test: $(INSTALLED) lint
	$(PY) -m console.devservers --dir .demo/test -- $(PY) -m pytest $(PYTEST_ARGS)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

check: $(INSTALLED)
	$(PY) manage.py check
	$(PY) manage.py makemigrations --check --dry-run

# Re-resolve every dependency in a throwaway venv and pin the result. torch is pinned without its local
# label (2.13.0, not 2.13.0+cpu): the CPU build this machine has on disk satisfies that pin, and a pin of
# +cpu is not on PyPI.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet -e ".[dev,serving]"
	.lock-venv/bin/python -m pip freeze --exclude-editable | grep -v '^neocloud-console' \
		| sed -E 's/^(torch==[^+]+)\+.*$$/\1/' > requirements.lock
	rm -rf .lock-venv

# The demo's agents leave accounts and processes outside .demo (SSH access made as root): they are torn
# down first, while the agent is still installed to do it. A clean goes on whatever the teardown says.
clean:
	-@if [ -x $(VENV)/bin/neocloud-agent ] && [ -d .demo/agents ]; then \
		$(VENV)/bin/neocloud-agent teardown --state-dir .demo/agents \
			|| echo "make clean: the demo's agents were not torn down (see above); removing their files all the same"; \
	fi
	rm -rf $(VENV) .demo staticfiles .pytest_cache
