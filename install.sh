#!/usr/bin/env bash
# Creates .venv with pinned dependencies, installs fairseq_fastseq into it, then runs the
# bundled demo (the Bible es→en model translates test verses, stock vs fast, offline).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version' 
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
# ve-fairseq is the fairseq 0.12 build for Python 3.11 (module `fairseq`). --no-deps keeps
# its torchaudio requirement (speech tasks only) from replacing the pinned torch.
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps ve-fairseq==0.12.3
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps .
# The C++ kernels, compiled once for this machine (g++, ninja): the attention of --fast-kernels
# fused/int8 and, with AVX-512, exact's linear layers and attention products in MKL's and bmm's
# order; with AMX, fused's linear layers as three bfloat16 products. Without them the tiers run their attention through bmm and exact runs MKL and bmm
# (slower, the same outputs), and say so.
.venv/bin/python -m fairseq_fastseq.step.native \
  || echo "install.sh: the native kernels were not built (see above); the kernel tiers run their attention through bmm and exact runs MKL" >&2
.venv/bin/python -m fairseq_fastseq.demo
