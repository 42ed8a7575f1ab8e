#!/usr/bin/env bash
# Packs programs of this machine, with the shared libraries ldd lists, into a compressed cpio archive that run.sh
# adds to the guest's initramfs (--initrd-extra): Spindle's own executable, fio. Each program keeps its path unless
# one is given after '='; libraries keep theirs.
#
# Usage: scripts/kernel-vm/pack.sh OUTPUT.gz [--lib LIBRARY]... PROGRAM[=GUEST_PATH]...
#   --lib adds a library that is loaded at run time rather than linked (ldd does not list it), e.g. libssl.so.3
#   for Spindle's TLS; a bare name is looked up with ldconfig.
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,9p' "$0" >&2; exit 2; }
output=$1
shift
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

copy() {
  local source=$1 target=$2
  mkdir -p "$root$(dirname "$target")"
  cp -L "$source" "$root$target"
}

with_libraries() {
  local file=$1 library
  for library in $(ldd "$file" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
    [ -e "$root$library" ] || copy "$library" "$library"
  done
}

while [ $# -gt 0 ]; do
  case $1 in
    --lib)
      library=$2
      if [ "${library#/}" = "$library" ]; then
        library=$(ldconfig -p | awk -v name="$2" '$1 == name && $NF ~ /^\// { print $NF; exit }')
        [ -n "$library" ] || { echo "pack.sh: library $2 not found (ldconfig -p)" >&2; exit 1; }
      fi
      copy "$library" "$library"
      with_libraries "$library"
      shift 2
      ;;
    *)
      source=${1%%=*}
      target=$source
      [ "$1" != "$source" ] && target=${1#*=}
      [ -x "$source" ] || { echo "pack.sh: $source is not an executable" >&2; exit 1; }
      copy "$source" "$target"
      chmod 0755 "$root$target"
      with_libraries "$source"
      shift
      ;;
  esac
done

(cd "$root" && find . | cpio -o -H newc -R 0:0 --quiet) | gzip -1 >"$output"
