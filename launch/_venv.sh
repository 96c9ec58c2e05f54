# Sourced by the launch scripts and .ci/run: create .venv when missing, install exactly the
# versions in requirements.lock (every extra), then this package without resolving again,
# check the result with `pip check`, and activate it. Quick when up to date.
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
stamp="$VENV/.moco_mm-installed"
if [ ! -f "$stamp" ] || [ requirements.lock -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    # Chained, not one line each: a caller without `set -e` (launch/test.sh) must not go on
    # to stamp a half-installed venv (a full disk, a registry down), which later runs would
    # take for installed. Without the stamp the next run installs again.
    if ! { python -m pip install -q --upgrade pip \
            && python -m pip install -q -r requirements.lock \
            && python -m pip install -q --no-deps -e . \
            && python -m pip check; }; then
        echo "launch/_venv.sh: installing into $VENV failed (above); not marked installed, the next run retries" >&2
        return 1
    fi
    touch "$stamp"
fi
