#!/usr/bin/env bash
# Set up a development environment from a bare machine: .venv/ with pinned Python packages
# (PyTorch, and the ROS 2 Kilted wheels when no ROS distribution is sourced), then
# `colcon build` of the orcnn_ros package into install/.
#
# Idempotent: each step records a stamp when it succeeds and is skipped while its inputs
# are unchanged, so a second run takes seconds and a failed run resumes where it stopped.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMPS="$VENV/.orcnn-setup"
PYTHON="${PYTHON:-python3.11}"
STEP=""

say() { printf '[setup] %s\n' "$*"; }

fail() {
    # One line that names the step and what to do; the step's stamp is not written.
    printf '[setup] FAILED at step "%s": %s\n' "$STEP" "$*" >&2
    exit 1
}

inputs_hash() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }

stamp_ok() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }

stamp_write() { mkdir -p "$STAMPS" && printf '%s' "$2" > "$STAMPS/$1"; }

# ---------------------------------------------------------------------------------------
STEP="python"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    if command -v python3 >/dev/null 2>&1 \
        && python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
        PYTHON=python3
    else
        fail "Python 3.11 not found (the pinned torch and ROS 2 Kilted wheels are cp311);" \
             "install python3.11 or set PYTHON=/path/to/python3.11"
    fi
fi

if [ -n "${ROS_DISTRO:-}" ]; then
    ROS_SOURCE="distro"
    say "using the sourced ROS 2 distribution '$ROS_DISTRO' (no ROS wheels installed)"
else
    ROS_SOURCE="wheels"
fi

# ---------------------------------------------------------------------------------------
STEP="venv"
if [ ! -x "$PY" ] || ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
        2>/dev/null; then
    say "creating .venv with $PYTHON"
    rm -rf "$VENV"
    venv_args=()
    # A ROS distribution's Python packages (rclpy, messages) live in the system
    # site-packages; the venv must see them.
    [ "$ROS_SOURCE" = "distro" ] && venv_args+=(--system-site-packages)
    "$PYTHON" -m venv "${venv_args[@]}" "$VENV" || fail "could not create .venv (on Debian:" \
        "apt install python3.11-venv), then re-run make setup"
fi

# ---------------------------------------------------------------------------------------
STEP="pip install"
req_files=(requirements/base.txt requirements/dev.txt constraints.txt)
[ "$ROS_SOURCE" = "wheels" ] && req_files+=(requirements/ros-wheels.txt)
req_hash="$(inputs_hash "${req_files[@]}" setup.py)-$ROS_SOURCE"
if stamp_ok pip "$req_hash"; then
    say "Python packages up to date"
else
    say "installing Python packages (first run: a few minutes, ~6 GB)"
    rm -f "$STAMPS/pip" "$STAMPS/colcon"
    pip_args=(-r requirements/base.txt -r requirements/dev.txt -c constraints.txt)
    [ "$ROS_SOURCE" = "wheels" ] && pip_args+=(-r requirements/ros-wheels.txt)
    # (the grep drops pip's notes about local package folders that do not exist)
    "$PY" -m pip install --disable-pip-version-check -q "${pip_args[@]}" \
        2> >(grep -v "^WARNING: Location 'file:" >&2) \
        || fail "pip could not install the pinned packages (is the package index reachable?" \
                "see the pip error above), then re-run make setup"
    # The library and its console script `orcnn-core`, editable so that edits take effect.
    "$PY" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e . \
        || fail "pip install -e . failed (see above), then re-run make setup"
    stamp_write pip "$req_hash"
fi

# ---------------------------------------------------------------------------------------
STEP="machine fixes"
if [ "$ROS_SOURCE" = "wheels" ]; then
    # The ROS wheels' exported CMake targets name include folders of the machine that built
    # them; point those paths at this Python's headers and the venv's numpy headers.
    py_include="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
    np_include="$("$PY" -c 'import numpy; print(numpy.get_include())')" \
        || fail "numpy is not importable in .venv; delete .venv and re-run make setup"
    for pair in "/opt/python/cp311-cp311/include/python3.11=$py_include" \
        "/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include=$np_include"
    do
        link="${pair%%=*}"
        target="${pair#*=}"
        if [ -e "$link" ]; then
            continue
        fi
        if mkdir -p "$(dirname "$link")" 2>/dev/null && ln -sfn "$target" "$link" 2>/dev/null
        then
            say "applied fix: linked $link -> $target (path baked into the ROS wheels)"
        else
            fail "cannot create $link (needed by the ROS wheels' CMake files); run once:" \
                 "sudo mkdir -p $(dirname "$link") && sudo ln -s $target $link"
        fi
    done
fi

# ---------------------------------------------------------------------------------------
STEP="colcon build"
mkdir -p log
# Rebuild when the package definition or the set of installed files changes. Python edits
# need no rebuild: --symlink-install links the sources into install/.
build_hash="$(
    { cat CMakeLists.txt package.xml msg/*.msg
      find orcnn_ros launch config models scripts/perception_node scripts/sim_camera \
          scripts/bag_infer scripts/demo -type f \
          -not -path '*/__pycache__/*' 2>/dev/null | sort
      echo "$ROS_SOURCE"; } | sha256sum | cut -c1-16)"
if stamp_ok colcon "$build_hash" && [ -f install/setup.bash ]; then
    say "colcon build up to date"
else
    say "building the orcnn_ros package with colcon"
    rm -f "$STAMPS/colcon"
    (
        # shellcheck disable=SC1091
        source "$VENV/bin/activate"
        # orcnn_core is pip-installed in editable mode; install/ must not hold a second copy.
        cmake_args=("-DPython3_EXECUTABLE=$PY" -DBUILD_TESTING=OFF -DORCNN_INSTALL_CORE=OFF)
        if [ "$ROS_SOURCE" = "wheels" ]; then
            export AMENT_PREFIX_PATH="$VENV${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
            export CMAKE_PREFIX_PATH="$VENV${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
        fi
        # CMake refuses exported include folders inside the source tree, and .venv/ lies in
        # it: name numpy's headers through a path outside it.
        np_include="$("$PY" -c 'import numpy; print(numpy.get_include())')"
        case "$np_include" in
            "$ROOT"/*)
                np_link="${XDG_CACHE_HOME:-$HOME/.cache}/orcnn_ros/$(
                    echo "$ROOT" | sha256sum | cut -c1-12)/numpy-include"
                mkdir -p "$(dirname "$np_link")" && ln -sfn "$np_include" "$np_link"
                cmake_args+=("-DPython3_NumPy_INCLUDE_DIR=$np_link")
                ;;
        esac
        colcon --log-base log build --base-paths "$ROOT" --build-base build \
            --install-base install --symlink-install \
            --cmake-args "${cmake_args[@]}"
    ) > log/colcon-build.txt 2>&1 || {
        tail -n 30 log/colcon-build.txt >&2
        fail "colcon build failed (full log: log/colcon-build.txt); fix and re-run make setup"
    }
    stamp_write colcon "$build_hash"
fi

say "ready: source .venv/bin/activate && source install/setup.bash"
