#!/usr/bin/env bash
# Installs what building and testing moefuse needs on a fresh Debian machine: compilers and libraries from
# Debian's packages, the Python stack from PyPI (pinned in pyproject.toml). Safe to run again.
set -euo pipefail

apt_pkgs=(cmake g++ make libopenblas-openmp-dev libgtest-dev)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Build tools for the Python module, then the runtime stack it is tested against.
python3 -m pip install -q --disable-pip-version-check scikit-build-core nanobind pytest \
  torch==2.11.0 transformers==5.17.0 "peft>=0.21,<0.22" safetensors tqdm matplotlib nvidia-cutlass==4.2.0.0
