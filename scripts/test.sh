#!/usr/bin/env bash
# The project's test command, on a fresh machine as in CI:
#   bash scripts/test.sh [pytest arguments]        (default: -q tests)
# Uses the active virtual environment, else creates or reuses .venv; installs the requirements when something is
# missing (scripts/env.sh, shared with scripts/demo.sh); then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
if [ $# -eq 0 ]; then
    set -- -q tests
fi
python -m pytest "$@"
