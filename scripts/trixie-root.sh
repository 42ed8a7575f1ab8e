#!/usr/bin/env bash
# Builds, once, a Debian 13 "trixie" root holding the peers that speak NBD extended headers (NBD_OPT_EXTENDED_HEADERS:
# libnbd >= 1.18, qemu >= 8.2), which Debian 12 does not have: libnbd-bin (nbdinfo, nbdcopy, nbdsh), python3-libnbd,
# nbdkit and qemu-utils (qemu-img, qemu-io, qemu-nbd). The tests run them with `chroot ROOT tool ...`; loopback is
# shared with the root, and a Unix socket is reached from both sides when it lives inside the root (the tests make
# their sockets under ROOT/tmp, so nothing is ever bind-mounted into it).
#
# Usage: scripts/trixie-root.sh [--rebuild]   prints the root's directory on stdout; logs go to stderr
#        --rebuild builds it afresh even when the stamp matches (to pick up newer trixie packages)
#
# Needs root (debootstrap, chroot). The root is /var/cache/spindle/trixie-root, or $SPINDLE_TRIXIE_ROOT. A stamp
# (ROOT/.spindle-trixie-stamp) records the package list and this script's layout version: when it matches, the call
# returns at once; when the list changes, the root is rebuilt beside the old one and swapped in. The packages come
# from the Debian mirror this machine's apt already uses (found in /etc/apt/sources.list{,.d}), or $SPINDLE_DEBIAN_MIRROR.
set -euo pipefail

log() { echo "trixie-root: $*" >&2; }
die() { log "error: $*"; exit 1; }

packages=(libnbd-bin python3-libnbd nbdkit qemu-utils)
suite=trixie
# Bump when the way the root is made changes (newer package versions need --rebuild instead).
layout=1
rebuild=0
[ "${1:-}" = "--rebuild" ] && rebuild=1

root=${SPINDLE_TRIXIE_ROOT:-/var/cache/spindle/trixie-root}
stamp_file=$root/.spindle-trixie-stamp
stamp="layout=$layout suite=$suite variant=minbase packages=$(printf '%s\n' "${packages[@]}" | sort | tr '\n' ' ')"

# Fast path: the root is there and was built from this very list.
current() { [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && [ -x "$root/usr/bin/nbdinfo" ] && [ -x "$root/usr/bin/qemu-nbd" ]; }
if [ $rebuild -eq 0 ] && current; then
  echo "$root"
  exit 0
fi

[ "$(id -u)" -eq 0 ] || die "building $root needs root (debootstrap and chroot): run this script as root"
for tool in debootstrap chroot flock timeout findmnt; do
  command -v "$tool" >/dev/null || die "$tool is missing: run scripts/install-deps.sh (it installs debootstrap)"
done

# The mirror: the first plain Debian archive among apt's enabled sources (deb822 URIs: lines and one-line deb entries).
find_mirror() {
  local files=() file
  [ -f /etc/apt/sources.list ] && files+=(/etc/apt/sources.list)
  for file in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
    [ -f "$file" ] && files+=("$file")
  done
  [ ${#files[@]} -gt 0 ] || return 0
  awk '
    /^[[:space:]]*#/ { next }
    tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i; next }
    $1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { print $i; break } }
  ' "${files[@]}" | grep -E '/debian/?$' | head -n 1
}
mirror=${SPINDLE_DEBIAN_MIRROR:-$(find_mirror)}
[ -n "$mirror" ] || die "no Debian mirror found in /etc/apt/sources.list{,.d}; set SPINDLE_DEBIAN_MIRROR=http://.../debian"

mkdir -p "$(dirname "$root")"
exec 9>"$root.lock"
flock -w 900 9 || die "timed out waiting for another build to finish ($root.lock)"

# Another caller may have finished the build while this one waited.
if [ $rebuild -eq 0 ] && current; then
  echo "$root"
  exit 0
fi

# Removes a directory tree that may still have something mounted in it (debootstrap mounts /proc and /sys while it
# works; a killed run can leave them): unmount first, deepest first, and never cross into another file system.
remove_tree() {
  local dir=$1 mount
  [ -e "$dir" ] || return 0
  findmnt -rn -o TARGET | awk -v d="$dir" 'index($0, d "/") == 1' | sort -r | while read -r mount; do
    umount -l "$mount" 2>/dev/null || true
  done
  rm -rf --one-file-system "$dir"
}

building=$root.building
log_file=$root.debootstrap.log
remove_tree "$building"
log "building $root from $mirror ($suite, minbase + ${packages[*]}); log: $log_file"
started=$(date +%s)
include=$(IFS=,; echo "${packages[*]}")
if ! timeout 1200 debootstrap --variant=minbase --include="$include" "$suite" "$building" "$mirror" >"$log_file" 2>&1; then
  tail -n 15 "$log_file" >&2 || true
  remove_tree "$building"
  die "debootstrap of Debian $suite from $mirror failed (full log: $log_file). The extended-header interop tests need this root: check that the mirror serves '$suite' (apt-get update works?), or point SPINDLE_DEBIAN_MIRROR at one that does"
fi

# Prove the tools run inside before anyone relies on them.
if ! { chroot "$building" nbdinfo --version && chroot "$building" qemu-nbd --version \
  && chroot "$building" nbdkit --version && chroot "$building" python3 -c 'import nbd'; } >/dev/null 2>&1; then
  remove_tree "$building"
  die "the new root was built but its tools do not run inside it (nbdinfo, qemu-nbd, nbdkit, python3 nbd; log: $log_file)"
fi

# Keep the root small: the downloaded packages are not needed once installed.
rm -rf "$building/var/cache/apt/archives/"*.deb
echo "$stamp" >"$building/.spindle-trixie-stamp"
remove_tree "$root"
mv "$building" "$root"
log "built in $(($(date +%s) - started)) s: $(chroot "$root" nbdinfo --version | head -n 1); $(chroot "$root" qemu-nbd --version | head -n 1)"
echo "$root"
