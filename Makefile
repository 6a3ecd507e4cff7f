# govshare — the two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
TYPECHECK := $(VENV)/typecheck/govshare

.PHONY: demo test lint typecheck pytest browser systemd libcrypto postgresql secretflow protos bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Runtime install (what `make demo` needs). setup.py builds ECDH-PSI's native batch path
# (protocols/x25519_batch.c) against OpenSSL's libcrypto when its headers are there (see
# `libcrypto`).
$(VENV)/.installed: pyproject.toml setup.py protocols/x25519_batch.c protocols/x25519_batch_build.py | $(BIN)/python libcrypto
	$(BIN)/pip install -q -e .
	touch $@

# Development install: runtime plus lint, type checks, tests.
$(VENV)/.installed-dev: pyproject.toml setup.py protocols/x25519_batch.c protocols/x25519_batch_build.py | $(BIN)/python libcrypto
	$(BIN)/pip install -q -e '.[dev]'
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	$(BIN)/python -m govshare.examples.demo

lint: $(VENV)/.installed-dev
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# mypy cannot follow setuptools' editable finder, so it reads the package through links that
# mirror the package-dir mapping of pyproject.toml (refreshed on every run).
typecheck: $(VENV)/.installed-dev
	mkdir -p $(TYPECHECK)
	for d in cli client examples model node protocols rpc; do ln -sfn "$(CURDIR)/$$d" $(TYPECHECK)/$$d; done
	ln -sfn "$(CURDIR)/protos/govshare/v1" $(TYPECHECK)/v1
	$(BIN)/mypy -p govshare
	$(BIN)/mypy tests bench

pytest: $(VENV)/.installed-dev browser systemd libcrypto postgresql secretflow
	$(BIN)/pytest --durations=25  # the slowest tests: make test stays within ~15 min

# Membership's RR22 engine (node/queries/engines/rr22.py) runs SecretFlow's libpsi (spu,
# Apache-2.0) under an interpreter of its own: spu needs numpy < 2 and jax, which clash with
# govshare's (tenseal brings numpy 2). This builds that environment from PyPI (measured here:
# 30 s idle, 78 s at load 7.5; 1.0 GB on disk). A node points [engines] rr22_python at
# $(SECRETFLOW)/bin/python; tests/node/queries/test_psi_rr22.py and bench/psi.py use it.
SECRETFLOW := $(VENV)/secretflow
SECRETFLOW_SPU := spu==0.9.5
secretflow: $(SECRETFLOW)/.installed
$(SECRETFLOW)/.installed:
	$(PYTHON) -m venv $(SECRETFLOW)
	$(SECRETFLOW)/bin/python -m pip install -q --upgrade pip
	$(SECRETFLOW)/bin/python -m pip install -q $(SECRETFLOW_SPU)
	touch $@

# tests/client/test_report.py renders the auditor's report page in a real headless browser: Debian's
# chromium, installed here when missing (as root, with apt-get), never skipped.
CHROMIUM := /usr/bin/chromium
browser:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium for tests/client/test_report.py (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	      >/dev/null || { echo "make: apt-get could not install chromium" >&2; exit 1; }; \
	  else \
	    echo "make: tests/client/test_report.py needs $(CHROMIUM) (Debian's chromium package):" \
	      "run 'sudo apt-get install chromium' and try again" >&2; exit 1; \
	  fi; \
	fi

# tests/deploy/test_deploy.py checks deploy/govshare-node@.service with systemd-analyze verify:
# Debian's systemd package, installed the same way when missing (it is not started).
SYSTEMD_ANALYZE := /usr/bin/systemd-analyze
systemd:
	@if [ ! -x $(SYSTEMD_ANALYZE) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing systemd for tests/deploy/test_deploy.py (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends systemd >/dev/null \
	      || { echo "make: apt-get could not install systemd" >&2; exit 1; }; \
	  else \
	    echo "make: tests/deploy/test_deploy.py needs $(SYSTEMD_ANALYZE) (Debian's systemd" \
	      "package): run 'sudo apt-get install systemd' and try again" >&2; exit 1; \
	  fi; \
	fi

# ECDH-PSI's native batch path (protocols/x25519_batch.c, built by setup.py with cffi) links
# OpenSSL 3's libcrypto: its headers are Debian's libssl-dev, installed here when missing (as
# root, with apt-get). Without them the install still succeeds and PSI masks point by point (a
# warning says so at run time); tests/protocols/test_x25519_batch.py then fails, as it needs
# the native path.
OPENSSL_H := /usr/include/openssl/evp.h
libcrypto:
	@if [ ! -f $(OPENSSL_H) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing libssl-dev for ECDH-PSI's native batch path (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends libssl-dev >/dev/null \
	      || { echo "make: apt-get could not install libssl-dev" >&2; exit 1; }; \
	  else \
	    echo "make: warning: $(OPENSSL_H) is missing (Debian's libssl-dev): PSI will mask" \
	      "point by point, and make pytest fails; run 'sudo apt-get install libssl-dev'," \
	      "then 'rm $(VENV)/.installed*' and make again" >&2; \
	  fi; \
	fi

# tests/node/data/test_source_postgresql.py starts its own PostgreSQL server with Debian's
# initdb and pg_ctl (as nobody when run as root): the postgresql package, installed the same way
# when missing; its own cluster is not used.
POSTGRES_INITDB := $(wildcard /usr/lib/postgresql/*/bin/initdb)
postgresql:
	@if [ -z "$(POSTGRES_INITDB)" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing postgresql for tests/node/data/test_source_postgresql.py (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends postgresql >/dev/null \
	      || { echo "make: apt-get could not install postgresql" >&2; exit 1; }; \
	  else \
	    echo "make: tests/node/data/test_source_postgresql.py needs initdb and pg_ctl (Debian's" \
	      "postgresql package): run 'sudo apt-get install postgresql' and try again" >&2; exit 1; \
	  fi; \
	fi

test: lint typecheck pytest

protos: $(VENV)/.installed-dev
	$(BIN)/python protos/generate.py

# Benchmarks (minutes; figures in README.md). Smaller runs: see each script's --help.
bench: $(VENV)/.installed
	$(BIN)/python bench/audit.py
	$(BIN)/python bench/psi.py
	$(BIN)/python bench/aggregate.py
	$(BIN)/python bench/load.py

clean:
	rm -rf $(VENV) build *.egg-info
