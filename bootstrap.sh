#!/usr/bin/env bash
# Install everything nestpress needs on a fresh Debian/Ubuntu machine (as root), then the
# project itself into .venv. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive
if [ "$(id -u)" -ne 0 ]; then echo "bootstrap.sh: run as root (apt-get)" >&2; exit 1; fi
# system packages: the list is harness/util.py SETUP_PACKAGES plus the kernel sources and test tools, and
# Debian's current kernel image with its headers and a static busybox (configs/shrinker-ab-distro.yaml boots
# that image; installed, it is a boot entry of a machine that boots from its disk, and nothing runs it here)
PKGS="qemu-system-x86 qemu-utils build-essential flex bison bc cpio ccache git tar xz-utils perl openssl
      libelf-dev libssl-dev util-linux procps kmod iproute2 rsync python3 python3-venv
      openssh-server openssh-client linux-source-6.1 linux-source-6.12
      busybox-static linux-image-amd64 linux-headers-amd64"
missing=$(for p in $PKGS; do dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"; done)
if [ -n "$missing" ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $missing
fi
# QEMU >= 10 (on Debian 12 from bookworm-backports, pinned) and a virtiofsd: nested guests under emulation
bash harness/setup_qemu.sh
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e '.[test]'
echo "bootstrap: ready ($(.venv/bin/python --version), $(qemu-system-x86_64 --version | head -1))"
