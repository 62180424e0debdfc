#!/usr/bin/env bash
# QEMU >= 10 for nested guests under emulation, on Debian 12 (bookworm), as root.
#
# bookworm ships QEMU 7.2, whose emulated SVM cannot keep an L1 alive once its L2 starts;
# bookworm-backports has QEMU 10. Only the QEMU packages and their firmware come from there
# (apt preferences); a backports suite that this script adds itself gives nothing else.
# QEMU 10 no longer ships the C virtiofsd and bookworm has no Rust one, so the daemon of
# bookworm's own QEMU 7.2 (Debian-signed, same libraries) is kept at $VIRTIOFSD.
# Elsewhere (another distro, or a QEMU >= 10 already) it changes nothing and says so.
# bootstrap.sh and `fab setup` both run it; running it again only adds what is missing.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
VIRTIOFSD=/usr/local/libexec/nestpress/virtiofsd
SOURCES=/etc/apt/sources.list.d/nestpress-bookworm-backports.sources
PREFS=/etc/apt/preferences.d/nestpress-qemu
QEMU_PKGS="qemu-system-x86 qemu-system-common qemu-system-data qemu-utils seabios"

qemu_major() { qemu-system-x86_64 --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -1; }
codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")

major=$(qemu_major || true)
if [ "${codename}" = bookworm ] && [ "${major:-0}" -lt 10 ]; then
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

have_virtiofsd() { [ -x /usr/libexec/virtiofsd ] || [ -x /usr/lib/qemu/virtiofsd ] || [ -x "$VIRTIOFSD" ]; }
if [ "${codename}" = bookworm ] && ! have_virtiofsd; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  chmod 755 "$tmp"     # apt's download user must be able to write there
  (cd "$tmp" && apt-get download -qq qemu-system-common/bookworm 2>/dev/null)
  deb=$(ls "$tmp"/qemu-system-common_*.deb)
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" ./usr/lib/qemu/virtiofsd
  install -D -o root -g root -m 0755 "$tmp/usr/lib/qemu/virtiofsd" "$VIRTIOFSD"
  dpkg-deb -f "$deb" Package Version > "$VIRTIOFSD.source"
fi

echo "setup_qemu: $(qemu-system-x86_64 --version | head -1); virtiofsd: $(
  for p in /usr/libexec/virtiofsd /usr/lib/qemu/virtiofsd "$VIRTIOFSD"; do [ -x "$p" ] && { echo "$p"; break; }; done
  have_virtiofsd || echo none)"
