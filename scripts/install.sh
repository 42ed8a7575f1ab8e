#!/usr/bin/env bash
# Installs Spindle for a service manager: the spindle executable, the systemd units (spindle.service, spindle.socket,
# spindle-attach@.service), a sample /etc/spindle/spindle.conf (kept if present), the manual pages (spindle(1) and
# spindle-COMMAND(1)) and the bash completion. docs/operations.md describes what each does.
#
# Usage: scripts/install.sh [--prefix /usr/local] [--sysconfdir /etc] [--unitdir DIR] [--destdir DIR] [--binary PATH]
#   --prefix      where bin/, share/man/ and share/bash-completion/ go [default: /usr/local]
#   --sysconfdir  where spindle/spindle.conf goes [default: /etc]
#   --unitdir     where the units go [default: /etc/systemd/system, or /lib/systemd/system with --prefix /usr]
#   --destdir     stage everything below this directory (packaging); the paths inside the units stay the real ones
#   --binary      install this spindle executable instead of building one with ./spindle (Native AOT)
# Then: systemctl daemon-reload (done here when systemd runs and --destdir is not given), and
#   systemctl enable --now spindle            (or spindle.socket for socket activation)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
prefix=/usr/local sysconfdir=/etc unitdir="" destdir="" binary=""
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="$2"; shift 2 ;;
    --sysconfdir) sysconfdir="$2"; shift 2 ;;
    --unitdir) unitdir="$2"; shift 2 ;;
    --destdir) destdir="$2"; shift 2 ;;
    --binary) binary="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$unitdir" ]; then
  if [ "$prefix" = /usr ]; then unitdir=/lib/systemd/system; else unitdir=/etc/systemd/system; fi
fi

if [ -z "$binary" ]; then
  "$root/spindle" --version >/dev/null
  binary="$root/artifacts/spindle/spindle"
fi
[ -x "$binary" ] || { echo "install.sh: $binary is not an executable" >&2; exit 1; }

bindir="$prefix/bin"
mandir="$prefix/share/man/man1"
completiondir="$prefix/share/bash-completion/completions"
install -d "$destdir$bindir" "$destdir$unitdir" "$destdir$mandir" "$destdir$completiondir" "$destdir$sysconfdir/spindle/attach"
install -m 0755 "$binary" "$destdir$bindir/spindle"
for unit in spindle.service spindle.socket spindle-attach@.service; do
  sed -e "s#@BINDIR@#$bindir#g" -e "s#@SYSCONFDIR@#$sysconfdir#g" "$root/dist/systemd/$unit" > "$destdir$unitdir/$unit"
  chmod 0644 "$destdir$unitdir/$unit"
done
[ -e "$destdir$sysconfdir/spindle/spindle.conf" ] || install -m 0644 "$root/dist/systemd/spindle.conf" "$destdir$sysconfdir/spindle/spindle.conf"
"$destdir$bindir/spindle" docs man "$destdir$mandir"
chmod 0644 "$destdir$mandir"/spindle*.1
"$destdir$bindir/spindle" docs bash-completion > "$destdir$completiondir/spindle"

echo "install.sh: spindle in $destdir$bindir, units in $destdir$unitdir, manual pages in $destdir$mandir, completion in $destdir$completiondir"
if [ -z "$destdir" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  echo "install.sh: systemd reloaded; start with: systemctl enable --now spindle (or spindle.socket)"
fi
