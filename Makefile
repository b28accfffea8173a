# Front door for operators and CI. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV    ?= .venv
PY      := $(abspath $(VENV))/bin/python
APPS    ?= 3
export PATH            := $(abspath $(VENV))/bin:$(PATH)
export CONTAINERS_CONF := $(CURDIR)/.config/containers/containers.conf
export ANSIBLE_CONFIG  := $(CURDIR)/ansible.cfg
export ANSIBLE_FORCE_COLOR ?= 0
export PY_COLORS ?= 0

.PHONY: help setup images fleet-up fleet-down fleet-status lint test-unit test-fast test-molecule test-fleet test-root test-e2e test demo bench clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup: ## Install OS packages, the virtualenv and the project-local podman config (idempotent)
	bash scripts/setup.sh

images: ## Build (or reuse, by recipe hash) the Debian 11 and 12 test images, and the fixture variants: -pg (PostgreSQL preinstalled, Molecule fixtures), debian11-app (an app host's packages, the second e2e fleet)
	$(PY) scripts/fleet.py images

fleet-up: images ## Start the local fleet: lb1, app1..app$(APPS), db1 (APPS=N to change)
	$(PY) scripts/fleet.py up --apps $(APPS)

fleet-down: ## Remove what fleet-up made (containers, network, key, generated inventory)
	$(PY) scripts/fleet.py down

fleet-status: ## Show the local fleet
	$(PY) scripts/fleet.py status

lint: ## yamllint, ansible-lint (production profile), ruff, promtool on the example alert rules
	yamllint -s .
	ansible-lint
	ruff check scripts tests examples roles molecule plugins conftest.py .config/molecule
	@command -v promtool >/dev/null || { echo "lint: promtool not found: run make setup"; exit 1; }
	promtool check rules monitoring/alerts.yml
	promtool test rules monitoring/alerts_test.yml

test-unit: ## Unit tests: scripts and the fixture app on a throwaway local PostgreSQL
	pytest -q -n 2 --dist loadfile tests/unit

test-fast: lint test-unit ## Lint + unit tests (the inner loop)

test-molecule: images ## Every role's Molecule scenario, two at a time (MOLECULE_JOBS=1 for one); logs in build/molecule/
	bash scripts/molecule_all.sh

test-fleet: images ## End-to-end tests on the local SSH fleet
	pytest -q tests/fleet

test-root: images ## `molecule test` at the root: migrate.yml and rollback.yml under load on a multi-host fleet, testinfra on every host
	molecule test

# E2E_WORKERS=2: two pytest-xdist workers, the second on a fleet of its own (made once the first has
# deployed, so the controller's caches are filled by one deploy at a time); `make test` uses 2.
E2E_WORKERS ?= 1
test-e2e: images ## migrate.yml and rollback.yml end to end on one shared fleet (E2E_WORKERS=2: two fleets), under load and on every failure path
	pytest -q -p no:cacheprovider --durations=0 $(if $(filter 1,$(E2E_WORKERS)),-s,-n $(E2E_WORKERS) --dist load -rA) tests/e2e

# The end-to-end tests take over the fleet the root scenario leaves (idle on v1, with data): one
# fleet for both, removed at the end whatever happened.
ROOT_FLEET := $(or $(DJM_MOLECULE_FLEET),djmmol)
# The root scenario has filled the caches by then: the end-to-end tests run on two fleets at once.
TEST_E2E_WORKERS ?= 2
# test-fast's lint and unit tests run side by side (each takes one core: 100 s and 220 s apart).
test: setup ## Everything CI runs: set-up (idempotent), lint, unit, every Molecule scenario, the fleet and end-to-end tests
	@t0=$$(date +%s); rc=0; \
	for tier in test-fast test-molecule test-fleet test-root test-e2e; do \
	  t=$$(date +%s); \
	  DJM_MOLECULE_KEEP=1 DJM_E2E_FLEET=$(ROOT_FLEET) DJM_E2E_REUSE=1 E2E_WORKERS=$(TEST_E2E_WORKERS) \
	    $(MAKE) $$([ $$tier = test-fast ] && echo "-j2 -Otarget") $$tier || rc=$$?; \
	  echo "=== $$tier: $$(( $$(date +%s) - t ))s (exit $$rc)"; [ $$rc -eq 0 ] || break; \
	done; \
	$(PY) scripts/fleet.py down --name $(ROOT_FLEET) >/dev/null 2>&1 || true; \
	$(PY) scripts/fleet.py down --name $(ROOT_FLEET)-gw1 >/dev/null 2>&1 || true; \
	echo "=== make test: exit $$rc after $$(( $$(date +%s) - t0 ))s"; exit $$rc

demo: setup ## The local fleet running the fixture app v1 with generated data, served through lb1 (127.0.0.1:8080)
	$(PY) scripts/demo.py --apps $(APPS)

bench: images ## Benchmarks, figures not tests: 3 vs 10 app hosts, load per stage, rollback modes; backup/restore vs raw; writes docs/benchmarks.md (about an hour)
	$(PY) scripts/bench_scale.py --no-doc
	$(PY) scripts/bench_backup.py --repeat 3 --no-doc
	$(PY) scripts/bench_report.py

clean: fleet-down ## fleet-down, then remove build artefacts
	rm -rf build .cache
