#!/usr/bin/env bash
# Install the real CALVIN simulator (mees/calvin_env) into the current Python environment, for eval_backend=calvin.
# An install recipe for users; CI does not run it (the tests that need calvin_env skip without it).
#
#   bash scripts/install_calvin_env.sh [CLONE_DIR]      (default: ../calvin_env, beside this checkout)
#   PYTHON=/path/to/venv/bin/python bash scripts/install_calvin_env.sh
#
# - A git clone, not an archive: calvin_env logs its own git commit when an env is built and fails outside a repo.
# - Editable install (-e): calvin_env finds its data/ (meshes, URDFs, textures) and conf/ folders beside the package.
# - --no-deps: calvin_env's requirements.txt also lists data-collection and GUI packages (opencv-python, numba,
#   pandas, matplotlib, hydra-colorlog) that evaluation never imports; the packages below are what it needs.
# - The tacto submodule (tactile sensor) is not needed and not fetched: only the static and gripper cameras are built.
# - Commit 797142c (2022-12-23) contains the LED-button reset fix (mees/calvin#32) that GR1-Training's README asks for.
# - Rendering uses pybullet's EGL plugin: on a GPU node the NVIDIA driver provides EGL (and calvin_env compiles a small
#   EGL probe with g++ to match EGL and CUDA devices); on a CPU machine Mesa's software renderer (llvmpipe) is used
#   (Debian/Ubuntu: apt-get install libegl1 libgl1-mesa-dri).
# Tested with: Python 3.11, pybullet 3.2.7, numpy 2.4.6, hydra-core 1.3.8, omegaconf 2.3.1, gym 0.26.2, scipy 1.17.1,
# opencv-python-headless 5.0.0.93, numpy-quaternion 2024.0.13, GitPython 3.2.1.
set -euo pipefail

COMMIT=797142c588c21e76717268b7b430958dbd13bf48
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$(dirname "$HERE")/calvin_env}"
PYTHON="${PYTHON:-python}"

if [ ! -d "$DIR/.git" ]; then
    git clone https://github.com/mees/calvin_env "$DIR"
fi
git -C "$DIR" fetch --quiet origin "$COMMIT" 2>/dev/null || true
git -C "$DIR" checkout --quiet "$COMMIT"

"$PYTHON" -m pip install hydra-core omegaconf gym scipy opencv-python-headless numpy-quaternion GitPython pybullet
"$PYTHON" -m pip install --no-deps -e "$DIR"

# Smoke test: build the env from the shipped scene-D config, reset, step once, and build the task oracle.
cd "$HERE"
"$PYTHON" - <<'EOF'
import numpy as np

from evaluation.calvin_env import make_calvin_env, make_calvin_oracle

env = make_calvin_env("", "cpu")
obs = env.reset()
obs, *_ = env.step(np.zeros(7))
assert obs["rgb_obs"]["rgb_static"].shape == (200, 200, 3) and obs["robot_obs"].shape == (15,)
assert len(make_calvin_oracle().tasks) == 34
env.close()
print("calvin_env works: eval_backend=calvin is available")
EOF
