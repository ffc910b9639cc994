#!/usr/bin/env bash
# Sets pamfx up on a fresh machine, then runs the demo: `bash setup.sh [--no-demo] [--bench] [demo options...]`.
# Installs Debian's Fashion-MNIST if it is missing, makes .venv, installs torch (the CPU wheel) and pamfx into it;
# --bench also installs the benchmark's extras (torch-pruning, matplotlib, scipy).
# Safe to run again: each step skips or does nothing when its work is already done.
set -euo pipefail
cd "$(dirname "$0")"

DATASET_DIR=/usr/share/datasets/fashion-mnist
WHEELS_DIR=/opt/wheels   # where this kind of machine keeps the CPU wheel of torch

run_demo=1
install_bench=0
demo_args=()
for arg in "$@"; do
    if [[ $arg == --no-demo ]]; then run_demo=0
    elif [[ $arg == --bench ]]; then install_bench=1
    else demo_args+=("$arg"); fi
done

if [[ ! -d $DATASET_DIR ]]; then
    as_root=()
    if [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null; then as_root=(sudo); fi
    echo "[setup] installing dataset-fashion-mnist"
    "${as_root[@]}" apt-get update -qq
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
fi

if [[ ! -x .venv/bin/python ]]; then
    echo "[setup] creating .venv"
    python3 -m venv .venv
fi

# Pinned exactly: a looser torch requirement lets pip pick a CUDA build of several GB from PyPI.
find_links=()
if [[ -d $WHEELS_DIR ]]; then find_links=(--find-links "$WHEELS_DIR"); fi
echo "[setup] installing torch==2.13.0 and pamfx into .venv"
.venv/bin/pip install -q --disable-pip-version-check "${find_links[@]}" torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'

if [[ $install_bench -eq 1 ]]; then
    echo "[setup] installing torch-pruning, matplotlib and scipy (the bench extra) into .venv"
    # --no-deps because torch-pruning's declared torch requirement would otherwise pull a CUDA build.
    .venv/bin/pip install -q --disable-pip-version-check --no-deps torch-pruning
    .venv/bin/pip install -q --disable-pip-version-check matplotlib scipy
fi

if [[ $run_demo -eq 1 ]]; then
    exec .venv/bin/python -m pamfx demo "${demo_args[@]}"
fi
