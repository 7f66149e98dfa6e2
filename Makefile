# Koding Caravan enrolment pipeline. `make` alone lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# A value given on the command line (make trace ID=..., PSQL_ARGS=..., any NAME=value) is
# data, never make text. GNU make expands a command-line variable where it is used and also
# when it exports it to a recipe's environment, which it does for every one: on its own,
# `make trace ID='$(shell touch /tmp/x)'` ran the command before the recipe started. So each
# becomes a simple variable holding its text exactly as typed ($(value ...): nothing is
# expanded, now or later), still exported. Recipes read values from the environment, quoted
# ("$$ID" in a recipe), and the CLI validates them; the two argument lists are split into
# words as a shell would, with nothing run or expanded: PYTEST_ARGS by pytest (as
# PYTEST_ADDOPTS), PSQL_ARGS by `workers psql --args`. (NAME:=value is expanded by make
# while it reads its command line, before this file: use NAME=value.)
$(foreach name,$(.VARIABLES),$(if $(filter command line,$(origin $(name))),$(eval override export $(name) := $$(value $(name)))))

.PHONY: help install venv-check run-workers test lint format migrate psql db-start db-stop db-remove \
	schema clean status trace failures replay reschedule leave leave-approve leave-cancel leaves \
	substitute doctor console operator-add operators \
	operator-revoke screenshots bench embedded-smoke moves move-request move-approve move-reject

help: ## list the targets
	@echo "Koding Caravan enrolment pipeline"
	@echo
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | \
		awk -F'\t' '{ printf "  make %-15s %s\n", $$1, $$2 }'
	@echo
	@echo "Database: DATABASE_URL, or (unset) the embedded PostgreSQL in .pgdata/."

# A .venv that is not a working virtual environment (a link to another machine's folder, a
# file, a venv whose Python is gone) is named with its fix in one line, before anything runs.
# Order-only and phony: checked on every run, without forcing a reinstall.
venv-check:
	@if [ -L $(VENV) ] && [ ! -e $(VENV) ]; then \
		echo "make: .venv is a link to $$(readlink $(VENV)), which does not exist on this machine; remove it and run make again: rm $(VENV)" >&2; exit 2; fi
	@if [ -e $(VENV) ] && [ ! -d $(VENV) ]; then \
		echo "make: .venv is a file, not a virtual environment; remove it and run make again: rm $(VENV)" >&2; exit 2; fi
	@if [ -d $(VENV) ] && [ -n "$$(ls -A $(VENV))" ] && ! $(PY) -c '' >/dev/null 2>&1; then \
		echo "make: .venv is not a working virtual environment ($(PY) does not run$$(test -L $(PY) && echo ": it links to $$(readlink $(PY))")); remove it and run make again: rm -rf $(VENV)" >&2; exit 2; fi

$(STAMP): pyproject.toml | venv-check
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=...)")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install the project with its dev tools

run-workers: $(STAMP) ## migrate, run WORKERS processes (default 2) in the foreground; Ctrl-C stops
	$(PY) -m workers run $${WORKERS:+--processes "$$WORKERS"}

test: $(STAMP) ## run the whole test suite against a real PostgreSQL (KC_TEST_SERVER=embedded: the embedded one)
	@url="$${TEST_DATABASE_URL:-}"; \
	if [ -z "$$url" ]; then url="$$($(PY) -m workers db-url --for-tests)" || exit 1; fi; \
	echo "tests use the server at $$url"; \
	TEST_DATABASE_URL="$$url" PYTEST_ADDOPTS="$${PYTEST_ADDOPTS:+$$PYTEST_ADDOPTS }$${PYTEST_ARGS:-}" \
		$(PY) -m pytest

lint: $(STAMP) ## ruff (lint + format check) and mypy
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: $(STAMP) ## apply ruff's fixes and formatting
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

migrate: $(STAMP) ## apply the migrations to the pipeline's database
	$(PY) -m workers migrate

psql: $(STAMP) ## psql on the pipeline's database, as its owner (extra arguments: PSQL_ARGS=...)
	@$(PY) -m workers psql --args "$${PSQL_ARGS:-}"

db-start: $(STAMP) ## start the embedded PostgreSQL alone (no workers); other commands never start it
	@$(PY) -m workers db-start

db-stop: $(STAMP) ## stop the embedded PostgreSQL
	$(PY) -m workers db-stop

db-remove: $(STAMP) ## stop the embedded PostgreSQL and delete its data: a clean slate
	@$(PY) -m workers db-remove

status: $(STAMP) ## per stage: backlog, in flight, failed, latency; counts of problems
	@$(PY) -m workers status

# ID, STAGE, SLOT, DATE, MODE, NAME, TRAINER, FIRST, LAST, REASON and SESSION reach the commands through the environment ("$$ID"),
# never as make or shell text (see the top of this file). The CLI validates them.
trace: $(STAMP) ## where is it, and why: make trace ID=<payment|purchase|allocation|student id>
	@test -n "$$ID" || { echo "usage: make trace ID=<uuid>"; exit 2; }
	@$(PY) -m workers trace "$$ID"

failures: $(STAMP) ## jobs held as failed after their last attempt, and rejected payments, with their errors
	@$(PY) -m workers failures

replay: $(STAMP) ## run a stage again: make replay STAGE=<stage> ID=<id> (no ID: all failed)
	@test -n "$$STAGE" || { echo "usage: make replay STAGE=purchase|allocation|sessions [ID=<uuid>]"; exit 2; }
	@if [ -n "$$ID" ]; then $(PY) -m workers replay "$$STAGE" "$$ID"; \
	else $(PY) -m workers replay "$$STAGE" --failed; fi

reschedule: $(STAMP) ## move what is ahead: make reschedule ID=<purchase> [SLOT="4 PM"] [DATE=YYYY-MM-DD] [MODE=weekdays]
	@test -n "$$ID" || { echo 'usage: make reschedule ID=<purchase id> [SLOT="4 PM"] [DATE=YYYY-MM-DD] [MODE=daily|weekdays|sunday_only]'; exit 2; }
	@args=("$$ID"); \
	if [ -n "$$SLOT" ]; then args+=(--time-slot "$$SLOT"); fi; \
	if [ -n "$$DATE" ]; then args+=(--start-date "$$DATE"); fi; \
	if [ -n "$$MODE" ]; then args+=(--mode "$$MODE"); fi; \
	$(PY) -m workers reschedule "$${args[@]}"

leave: $(STAMP) ## record a trainer's leave: make leave TRAINER=<id> FIRST=YYYY-MM-DD LAST=YYYY-MM-DD REASON="..."
	@test -n "$$TRAINER" -a -n "$$FIRST" -a -n "$$LAST" -a -n "$$REASON" || { echo 'usage: make leave TRAINER=<trainer id> FIRST=YYYY-MM-DD LAST=YYYY-MM-DD REASON="why"'; exit 2; }
	@$(PY) -m workers leave request "$$TRAINER" "$$FIRST" "$$LAST" --reason "$$REASON"

leave-approve: $(STAMP) ## approve a leave: substitutes for its sessions now: make leave-approve ID=<leave id>
	@test -n "$$ID" || { echo "usage: make leave-approve ID=<leave id>"; exit 2; }
	@$(PY) -m workers leave approve "$$ID"

leave-cancel: $(STAMP) ## cancel a leave; sessions ahead go back to the trainer: make leave-cancel ID=<leave id>
	@test -n "$$ID" || { echo "usage: make leave-cancel ID=<leave id>"; exit 2; }
	@$(PY) -m workers leave cancel "$$ID"

leaves: $(STAMP) ## trainers' leaves not cancelled and not over
	@$(PY) -m workers leave list

substitute: $(STAMP) ## a substitute for one session: make substitute SESSION=<session id> [TRAINER=<id>, else the best]
	@test -n "$$SESSION" || { echo "usage: make substitute SESSION=<session id> [TRAINER=<trainer id>]"; exit 2; }
	@$(PY) -m workers substitute "$$SESSION" $${TRAINER:+"$$TRAINER"}

moves: $(STAMP) ## requests to move one session: the pending first (STATUS=pending|approved|rejected|cancelled)
	@$(PY) -m workers move list $${STATUS:+--status "$$STATUS"}

move-request: $(STAMP) ## ask to move one session: make move-request ID=<session> DATE=YYYY-MM-DD TIME="10 AM" REASON="..." [AS=student|trainer]
	@test -n "$$ID" -a -n "$$DATE" -a -n "$$TIME" -a -n "$$REASON" || { echo 'usage: make move-request ID=<session id> DATE=YYYY-MM-DD TIME="10 AM" REASON="why" [AS=student|trainer|operator]'; exit 2; }
	@$(PY) -m workers move request "$$ID" "$$DATE" "$$TIME" --reason "$$REASON" $${AS:+--as "$$AS"}

move-approve: $(STAMP) ## carry out a move: make move-approve ID=<request> [SUBSTITUTE=1: the best other trainer when the session's cannot]
	@test -n "$$ID" || { echo "usage: make move-approve ID=<request id> [SUBSTITUTE=1]"; exit 2; }
	@$(PY) -m workers move approve "$$ID" $${SUBSTITUTE:+--substitute}

move-reject: $(STAMP) ## reject a move: make move-reject ID=<request> REASON="..."
	@test -n "$$ID" -a -n "$$REASON" || { echo 'usage: make move-reject ID=<request id> REASON="why"'; exit 2; }
	@$(PY) -m workers move reject "$$ID" --reason "$$REASON"

doctor: $(STAMP) ## check database, migrations, pgqueuer, triggers, workers, backlog
	@$(PY) -m workers doctor

console: $(STAMP) ## the operations console in a browser: http://127.0.0.1:8080 (CONSOLE_HOST, CONSOLE_PORT; actions need an operator: make operator-add)
	$(PY) -m workers console $${CONSOLE_HOST:+--host "$$CONSOLE_HOST"} $${CONSOLE_PORT:+--port "$$CONSOLE_PORT"}

operator-add: $(STAMP) ## a console operator: make operator-add NAME=<name> (prints their token, once)
	@test -n "$$NAME" || { echo "usage: make operator-add NAME=<the person's name>"; exit 2; }
	@$(PY) -m workers operator add "$$NAME"

operators: $(STAMP) ## the console's operators: live or revoked, sessions, last sign-in
	@$(PY) -m workers operator list

operator-revoke: $(STAMP) ## revoke a console operator: make operator-revoke NAME=<name> (their sessions end now)
	@test -n "$$NAME" || { echo "usage: make operator-revoke NAME=<name>"; exit 2; }
	@$(PY) -m workers operator revoke "$$NAME"

screenshots: $(STAMP) ## docs/console-overview.png and docs/console-trace.png, taken by the console's browser test (headless chromium)
	KC_SCREENSHOT_DIR=docs $(MAKE) --no-print-directory test PYTEST_ARGS="-q -p no:cacheprovider tests/browser/test_console_browser.py"

bench: $(STAMP) ## benchmark on a fresh database: table, bench-out/results.json and bench.png (QUICK=1: small; BACKLOGS="1000 10000"; SCARCE=1: only the scarce-trainer burst)
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(PY) -m bench $${SCARCE:+scarce} $${QUICK:+--quick} $${BACKLOGS:+--backlogs $$BACKLOGS}

embedded-smoke: ## a fresh clone of HEAD in a private folder: run-workers, one payment, 10 sessions, db-stop
	bash .ci/embedded-smoke

schema: $(STAMP) ## rewrite sql/schema.sql from the migrated database (review the diff)
	$(PY) -m workers schema

clean: ## remove caches (keeps .venv and the embedded database)
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis

