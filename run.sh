#!/usr/bin/env bash
# The two everyday commands, with all of their set-up:
#   ./run.sh demo [snakemake args]   the whole workflow on the embedded demo cohort
#   ./run.sh test [pytest args]      the test suite
# The first call makes a virtual environment (.venv, or $BONEDRR_VENV) with Python 3.11 and installs
# the pinned dependencies; later calls reuse it (and reinstall when pyproject.toml changes).
set -euo pipefail
cd "$(dirname "$0")"

venv=${BONEDRR_VENV:-.venv}
python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3 python; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      python=$candidate
      break
    fi
  done
fi
if [ -z "$python" ]; then
  echo "run.sh: Python 3.11 is needed (set PYTHON=/path/to/python3.11)" >&2
  exit 2
fi

if [ ! -x "$venv/bin/python" ] || [ pyproject.toml -nt "$venv/.installed" ]; then
  echo "run.sh: setting up $venv (pinned dependencies, a few minutes the first time)" >&2
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e ".[test]"
  touch "$venv/.installed"
fi
export PATH="$PWD/$venv/bin:$PATH"

command=${1:-}
[ $# -gt 0 ] && shift
case "$command" in
  demo) exec snakemake --cores all "$@" ;;
  test) exec python -m pytest "$@" ;;
  *) echo "usage: ./run.sh demo [snakemake args] | ./run.sh test [pytest args]" >&2; exit 2 ;;
esac
