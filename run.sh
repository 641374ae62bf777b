#!/usr/bin/env bash
# medcert's entry point on a fresh machine.
#   ./run.sh               set up (first run only) and run the main job: the quick study
#   ./run.sh test [ARGS]   set up (first run only) and run the tests: python -m pytest [ARGS]
#   ./run.sh lab [ARGS]    set up (first run only), register the kernel "medcert" and start JupyterLab
#                          on notebooks/ at 127.0.0.1 (it prints the URL with its token)
#   ./run.sh ARGS...       any `python -m medcert_core` command, e.g. ./run.sh certify --help
# Trained models go to the model cache, outside the checkout: $MEDCERT_CACHE, else $XDG_CACHE_HOME/medcert,
# else ~/.cache/medcert (a fresh clone reuses them; move it and set MEDCERT_CACHE, or rm -rf it to clear it).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${MEDCERT_VENV:-.venv}"
STAMP="$VENV/.installed-$(cat requirements.txt pyproject.toml | sha1sum | cut -c1-12)"

if [ ! -f "$STAMP" ]; then
  echo "[medcert] creating $VENV and installing requirements (first run: a few minutes)"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --no-compile -r requirements.txt  # .pyc on first import instead
  "$VENV/bin/python" -m pip install --quiet --no-deps -e .
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi

export HF_HUB_OFFLINE=1
if [ "${1:-}" = "test" ]; then
  shift
  exec "$VENV/bin/python" -m pytest "$@"
fi
if [ "${1:-}" = "lab" ]; then
  shift
  # the project's interpreter as the kernel "medcert", inside the environment (no user-wide install)
  "$VENV/bin/python" -m ipykernel install --sys-prefix --name medcert --display-name "medcert (.venv)" > /dev/null
  AS_ROOT=(); [ "$(id -u)" -eq 0 ] && AS_ROOT=(--allow-root)  # containers often run as root
  exec "$VENV/bin/jupyter" lab --no-browser --ip 127.0.0.1 --notebook-dir notebooks "${AS_ROOT[@]}" "$@"
fi
if [ "$#" -eq 0 ]; then
  echo "[medcert] model cache: ${MEDCERT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/medcert} (MEDCERT_CACHE moves it)"
  set -- study --profile quick
fi
exec "$VENV/bin/python" -m medcert_core "$@"
