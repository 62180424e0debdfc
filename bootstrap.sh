#!/usr/bin/env bash
# Install everything nestpress needs on a fresh Debian/Ubuntu machine (as root), then the project itself
# into .venv. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")"
if [ "$(id -u)" -ne 0 ]; then echo "bootstrap.sh: run as root (apt-get)" >&2; exit 1; fi
# harness/setup.sh installs harness/packages.txt and the QEMUs; on top, what the default experiments and the
# tests use: both kernel sources, Debian's current kernel image with its headers and a static busybox
# (configs/shrinker-ab-distro.yaml boots that image; installed, it is a boot entry of a machine that boots from
# its disk, and nothing runs it here), and sshd for the lab tests
bash harness/setup.sh linux-source-6.1 linux-source-6.12 busybox-static linux-image-amd64 linux-headers-amd64 \
  openssh-server
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e '.[test]'
echo "bootstrap: ready ($(.venv/bin/python --version), $(qemu-system-x86_64 --version | head -1))"
