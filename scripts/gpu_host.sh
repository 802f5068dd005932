# Sourced by gpu_train.sh and gpu_detect_benchmark.sh: what both need on a lent GPU host, whose image has torch but
# neither MONAI nor einops and no network. `use_carried_wheels DIR` installs the wheels carried in DIR (made here by
# `gpu_train.sh wheels`) into /tmp/site and puts it on PYTHONPATH, unless MONAI is importable already.
# Where `gpu_train.sh wheels` puts the wheels, and the path both scripts' device calls carry.
WHEELS=build/gpu/wheels

use_carried_wheels() {
    "$PY" -c 'import monai' 2>/dev/null && return 0
    ls "$1"/*.whl >/dev/null 2>&1 || { echo "MONAI missing and no wheels in $1" >&2; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$1"/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
}
