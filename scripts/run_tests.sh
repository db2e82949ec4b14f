#!/usr/bin/env bash
# Run the whole test suite in the set-up environment. Fails when no test ran.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
# The generated setup scripts read unset variables: source them without nounset.
set +u
# shellcheck disable=SC1091
source .venv/bin/activate && source install/setup.bash || {
    echo "[test] environment missing: run make setup" >&2; exit 1; }
set -u
# Keep DDS traffic of tests on this machine.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
# `pytest`, not `python -m pytest`: the latter puts the repository root on sys.path.
pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "[test] FAILED: no tests were collected" >&2
fi
exit "$rc"
