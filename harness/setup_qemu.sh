#!/usr/bin/env bash
# The QEMUs nestpress needs under emulation (TCG), on Debian 12 (bookworm), as root.
#
# Each topology works with one generation of QEMU's emulated SVM (measured; README "Which QEMU"):
# nested needs QEMU >= 10, which bookworm-backports has; shadow needs QEMU < 10, i.e. bookworm's 7.2.
# So QEMU 10 becomes the system's QEMU, from bookworm-backports with only the QEMU packages and
# their firmware pinned (a backports suite that this script adds itself gives nothing else), and
# bookworm's own QEMU 7.2 (Debian-signed, the same libraries) is kept as a private tree in
# $PRIVATE/qemu-7.2, which also provides the C virtiofsd that QEMU 10 no longer ships.
# Elsewhere (another distribution) it changes nothing and says so; `fab doctor` tells which
# topologies the QEMUs found can run. bootstrap.sh and `fab setup` run it; running it again only
# adds what is missing.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
PRIVATE=/usr/local/lib/nestpress
SOURCES=/etc/apt/sources.list.d/nestpress-bookworm-backports.sources
PREFS=/etc/apt/preferences.d/nestpress-qemu
QEMU_PKGS="qemu-system-x86 qemu-system-common qemu-system-data qemu-utils seabios"

qemu_major() { "$1" --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -1; }
codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
if [ "$codename" != bookworm ]; then
  echo "setup_qemu: not Debian 12 (bookworm): the distribution's QEMU is used as it is; see fab doctor"
  exit 0
fi

# bookworm's QEMU 7.2 as a private tree (before the system's becomes 10: apt downloads it either way)
if [ ! -x "$PRIVATE/qemu-7.2/usr/bin/qemu-system-x86_64" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  chmod 755 "$tmp"     # apt's download user writes there
  (cd "$tmp" && apt-get download -qq qemu-system-x86/bookworm qemu-system-common/bookworm \
                                   qemu-system-data/bookworm 2>/dev/null)
  rm -rf "$PRIVATE/qemu-7.2.tmp"
  mkdir -p "$PRIVATE/qemu-7.2.tmp"
  for deb in "$tmp"/*.deb; do
    dpkg-deb -x "$deb" "$PRIVATE/qemu-7.2.tmp"
    dpkg-deb -f "$deb" Package Version >> "$PRIVATE/qemu-7.2.tmp/SOURCE"
  done
  chown -R root:root "$PRIVATE/qemu-7.2.tmp"
  chmod -R go-w "$PRIVATE/qemu-7.2.tmp"
  mv "$PRIVATE/qemu-7.2.tmp" "$PRIVATE/qemu-7.2"
fi
missing=$(ldd "$PRIVATE/qemu-7.2/usr/bin/qemu-system-x86_64" | awk '/not found/ {print $1}')
if [ -n "$missing" ]; then
  echo "setup_qemu: QEMU 7.2 in $PRIVATE/qemu-7.2 lacks libraries: $missing (apt-get install qemu-system-x86/bookworm once, then rerun)" >&2
  exit 1
fi

# QEMU >= 10 as the system's QEMU, from bookworm-backports, pinned
if [ "$(qemu_major qemu-system-x86_64 || true)" -lt 10 ] 2>/dev/null || ! command -v qemu-system-x86_64 >/dev/null; then
  if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\n%s\n' \
      "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" > "$SOURCES"
    # added by us: nothing from it but what is pinned below
    printf 'Package: *\nPin: release n=bookworm-backports\nPin-Priority: -10\n\n' > "$PREFS"
  else
    : > "$PREFS"
  fi
  printf 'Package: %s\nPin: release n=bookworm-backports\nPin-Priority: 990\n' "$QEMU_PKGS" >> "$PREFS"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends qemu-system-x86 qemu-utils
fi

echo "setup_qemu: system $(qemu-system-x86_64 --version | head -1); private" \
     "$("$PRIVATE/qemu-7.2/usr/bin/qemu-system-x86_64" --version | head -1) in $PRIVATE/qemu-7.2"
