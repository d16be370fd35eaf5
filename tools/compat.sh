#!/usr/bin/env bash
# Run the test suite under a given torch (and torchvision) in a virtual environment of its own.
#
#   tools/compat.sh 2.1.2 0.16.2          # a torch / torchvision pair
#   tools/compat.sh 2.4.1                 # torchvision: the one pip finds for that torch
#   tools/compat.sh latest                # the newest of both
#   tools/compat.sh 2.1.2 0.16.2 tests/test_exit.py   # pytest arguments instead of `tests`
#
# The environment is made in $COMPAT_DIR/torch-VERSION (default ~/.cache/simclr-compat),
# outside the repository, from requirements.txt plus the pinned versions and pytest, and is
# reused by a later run. Torch before 2.3 was built against NumPy 1, so it gets numpy<2.
# $PYTHON chooses the interpreter (default python3; torch 2.1 has wheels up to Python 3.11).
# The last line gives the date, the versions and pytest's summary; the exit status is pytest's.
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: tools/compat.sh TORCH_VERSION|latest [TORCHVISION_VERSION] [PYTEST_ARGS...]"
torch_version=${1:?$usage}
shift
vision_version=""
if [[ $# -gt 0 && $1 =~ ^[0-9]+\.[0-9]+ ]]; then
    vision_version=$1
    shift
fi

pins=()
if [[ $torch_version == latest ]]; then
    pins+=(--upgrade torch torchvision)
else
    [[ $torch_version =~ ^2\.([0-9]+)(\.|$) ]] || { echo "tools/compat.sh: error: torch $torch_version is not 2.x; $usage" >&2; exit 2; }
    pins+=("torch==$torch_version")
    if (( BASH_REMATCH[1] < 3 )); then
        pins+=("numpy<2")
    fi
fi
if [[ -n $vision_version ]]; then
    pins+=("torchvision==$vision_version")
fi

venv="${COMPAT_DIR:-$HOME/.cache/simclr-compat}/torch-$torch_version${vision_version:+-vision-$vision_version}"
if [[ ! -x $venv/bin/python ]]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
echo "tools/compat.sh: installing into $venv: -r requirements.txt pytest ${pins[*]}"
"$venv/bin/python" -m pip install -q -r requirements.txt pytest "${pins[@]}"

versions=$("$venv/bin/python" -c "import platform, numpy, torch, torchvision; print(f'torch {torch.__version__}, '
    f'torchvision {torchvision.__version__}, numpy {numpy.__version__}, Python {platform.python_version()}')")
echo "tools/compat.sh: $versions"
status=0
"$venv/bin/python" -m pytest -q "${@:-tests}" 2>&1 | tee "$venv/pytest.log" || status=${PIPESTATUS[0]}
echo "tools/compat.sh: $(date -u +%F) $versions: $(tail -n 1 "$venv/pytest.log" | tr -d '=' | xargs)"
exit "$status"
