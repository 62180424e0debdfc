#!/usr/bin/env bash
# Install what nestpress needs on a Debian/Ubuntu host, as root: harness/packages.txt, the packages named as
# arguments (kernel sources, a distribution kernel, ...), then the QEMUs (setup_qemu.sh). The one setup: this
# machine's (bootstrap.sh, `python -m harness setup`) and a lab host's (`fab -H host setup`). Only adds what is
# missing; safe to run again.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ "$(id -u)" -ne 0 ]; then echo "setup: run as root (apt-get)" >&2; exit 1; fi
export DEBIAN_FRONTEND=noninteractive
wanted="$(sed 's/#.*//' "$here/packages.txt") $*"
for p in $wanted; do
  [[ "$p" =~ ^[a-z0-9][a-z0-9+.-]+$ ]] || { echo "setup: not a Debian package name: $p" >&2; exit 2; }
done
missing=$(for p in $wanted; do dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "ok installed" || echo "$p"; done)
if [ -n "$missing" ]; then
  apt-get update -qq
  # shellcheck disable=SC2086  # one word per package
  apt-get install -y -qq --no-install-recommends $missing
fi
bash "$here/setup_qemu.sh"
echo "setup: installed $(echo $wanted | wc -w) packages and the QEMUs"
