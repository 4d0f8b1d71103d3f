#!/usr/bin/env bash
# One peer quantizer in its own venv: scripts/peers/setup.sh autoround|llmcompressor
#
# .venv-peer-<tool> (git-ignored, never the project's venv or lock): torch==2.14.1 first (pip takes
# it from this machine's disk), then scripts/peers/requirements-<tool>.txt with --no-deps (every
# package pinned exactly), then checks that torch is still 2.14.1 and runs pip check. Installing
# needs PyPI; running the tools later needs no network (HF_HUB_OFFLINE=1 in their scripts).
set -euo pipefail
tool=${1:?usage: $0 autoround|llmcompressor}
case $tool in autoround|llmcompressor) ;; *) echo "error: unknown tool $tool" >&2; exit 2 ;; esac
here=$(cd "$(dirname "$0")" && pwd)
venv=${PEER_VENV_ROOT:-.}/.venv-peer-$tool
python=${PYTHON:-python3}
rm -rf "$venv"
$python -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet torch==2.14.1
"$venv/bin/python" -m pip install --quiet --no-deps -r "$here/requirements-$tool.txt"
version=$("$venv/bin/python" -c "import torch; print(torch.__version__)")
if [ "${version%%+*}" != 2.14.1 ]; then
    echo "error: torch in $venv is $version, not 2.14.1" >&2
    exit 1
fi
# llmcompressor 0.14.0.1 declares torch<=2.14.0 (see requirements-llmcompressor.txt): that conflict
# is expected and printed; any other is an error.
conflicts=$("$venv/bin/python" -m pip check 2>&1 || true)
others=$(printf '%s\n' "$conflicts" | grep -v -E '^No broken requirements|has requirement torch<=2\.14\.0[^ ]*, but you have torch 2\.14\.1' || true)
printf '%s\n' "$conflicts"
if [ -n "$others" ]; then
    echo "error: unexpected dependency conflicts in $venv" >&2
    exit 1
fi
"$venv/bin/python" -m pip freeze > "$venv/freeze.txt"
touch "$venv/.installed"
echo "$venv: torch $version, $(grep -i -E '^(auto-round|llmcompressor)==' "$venv/freeze.txt" | tr '\n' ' ')"
