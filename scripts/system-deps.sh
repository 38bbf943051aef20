#!/usr/bin/env bash
# Headless rendering for MuJoCo (MUJOCO_GL=egl) needs Mesa's EGL. Machines of the reference image
# have it; elsewhere install it with apt when we may, or say what to install.
set -euo pipefail
if ldconfig -p 2>/dev/null | grep -q 'libEGL.so.1'; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "[setup] installing Mesa EGL for headless MuJoCo rendering (apt-get)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libegl1 libgl1-mesa-dri >/dev/null
else
  echo "[setup] warning: libEGL.so.1 not found; install your distribution's Mesa EGL (Debian: libegl1 libgl1-mesa-dri)" >&2
  echo "        or set MUJOCO_GL=osmesa with libosmesa6 installed, before rendering simulators." >&2
fi
