# Shared by scripts/cluster and scripts/test: create a virtualenv with Python >= 3.11.
find_python() {
    for py in python3.13 python3.12 python3.11 python3; do
        if command -v "$py" >/dev/null 2>&1 &&
            "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$py"
            return 0
        fi
    done
    echo "gossip needs Python 3.11 or newer; none found on PATH" >&2
    return 1
}

ensure_venv() {
    local dir="$1"
    if [ ! -x "$dir/bin/python" ]; then
        local py
        py=$(find_python)
        "$py" -m venv "$dir" || {
            echo "could not create $dir: on Debian, apt-get install python3-venv" >&2
            return 1
        }
        "$dir/bin/python" -m pip install -q --upgrade pip >/dev/null
    fi
    VENV_PY="$(cd "$dir" && pwd)/bin/python"
}

# PYTHONWARNINGS: setuptools prints its notices (e.g. the page about strict editable
# installs) as UserWarnings on every set-up; they say nothing the user must act on.
quiet_pip() {
    PYTHONWARNINGS=ignore::UserWarning "$VENV_PY" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v '^WARNING: Location' >&2)
}
