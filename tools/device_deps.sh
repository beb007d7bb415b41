#!/usr/bin/env bash
# Prepares .deps/ (git-ignored) for a GPU machine that has no network, BLAS or GoogleTest: Debian's reference BLAS
# with CBLAS (small, no dependencies but libc) and GoogleTest's sources. Carry .deps with the call that runs
# tools/device.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
for p in libblas-dev googletest; do dpkg -s "$p" >/dev/null 2>&1 || $sudo apt-get install -y -qq "$p" >/dev/null; done
rm -rf .deps && mkdir -p .deps/blas/lib .deps/blas/include
cp -L /usr/lib/x86_64-linux-gnu/blas/libblas.so.3 .deps/blas/lib/
ln -s libblas.so.3 .deps/blas/lib/libblas.so
cp /usr/include/x86_64-linux-gnu/cblas-netlib.h .deps/blas/include/cblas.h
cp /usr/include/x86_64-linux-gnu/cblas_mangling.h .deps/blas/include/
cp -r /usr/src/googletest .deps/googletest
du -sh .deps
