# The project's one install step, sourced by scripts/demo.sh and scripts/test.sh (and .ci/run):
#   . scripts/env.sh
# Uses the active virtual environment, else creates (or reuses) .venv at the project root and activates it. Installs
# the requirements when a needed package is missing or the requirements files changed since the last install into
# this environment (a stamp in the environment records them); otherwise it installs nothing.
# - torch already importable (e.g. a CUDA build you installed): requirements.txt + requirements-dev.txt, which keep it.
# - no torch yet: requirements-ci.txt, which pins the torch version tested here (2.13.0; the CI image's index has its
#   CPU build) and adds the rest.

gr1_env_setup() {
    local root stamp want
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    if [ -z "${VIRTUAL_ENV:-}" ]; then
        if [ ! -x "$root/.venv/bin/python" ]; then
            echo "creating the virtual environment $root/.venv"
            python3 -m venv "$root/.venv" || return 1
        fi
        # shellcheck disable=SC1091
        . "$root/.venv/bin/activate"
    fi
    stamp="$VIRTUAL_ENV/.gr1-requirements.sha256"
    want="$(cat "$root"/requirements*.txt | sha256sum | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && python - <<'PY'
import importlib.util, sys
needed = ("torch", "transformers", "accelerate", "clip", "lmdb", "pybullet", "matplotlib", "pytest", "ruff")
sys.exit(any(importlib.util.find_spec(name) is None for name in needed))
PY
    then
        return 0
    fi
    echo "installing the requirements into $VIRTUAL_ENV"
    if python -c "import torch" 2>/dev/null; then
        python -m pip install -q -r "$root/requirements.txt" -r "$root/requirements-dev.txt" || return 1
    else
        python -m pip install -q -r "$root/requirements-ci.txt" || return 1
    fi
    echo "$want" > "$stamp"
}

gr1_env_setup
