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
# The ROS 2 launch system and command line (ros2 launch, ros2 param, ros2 lifecycle, ...)
# for the launch tests: a ROS 2 distribution has them; on the PyPI wheels they come from the
# optional toolkit next to the repository, installed into .ros2-cli/ (seconds once done).
# Without either, the launch tests skip and say why.
TOOLKIT="$ROOT/../shared/ros2-cli"
if [ -z "${ROS_DISTRO:-}" ] && [ -x "$TOOLKIT/install.sh" ]; then
    mkdir -p log
    [ -f "$ROOT/.ros2-cli/.msg-done" ] || echo "[test] installing the ROS 2 launch system" \
        "and command line into .ros2-cli/ (first run: about a minute)"
    "$TOOLKIT/install.sh" "$ROOT/.ros2-cli" > log/ros2-cli-install.txt 2>&1 || {
        tail -n 20 log/ros2-cli-install.txt >&2
        echo "[test] FAILED to install the ROS 2 launch tools from $TOOLKIT" \
             "(full log: log/ros2-cli-install.txt)" >&2
        exit 1; }
    # shellcheck disable=SC1091
    source "$ROOT/.ros2-cli/setup.bash"
elif [ -z "${ROS_DISTRO:-}" ] && [ -f "$ROOT/.ros2-cli/setup.bash" ]; then
    # shellcheck disable=SC1091
    source "$ROOT/.ros2-cli/setup.bash"   # installed by an earlier run
fi
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
