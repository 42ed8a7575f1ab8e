#!/usr/bin/env bash
# Builds, once, the small VM that runs the real Linux NBD client (nbd.ko + nbd-client) against a Spindle server:
# Debian's kernel (downloaded as a .deb, never installed on this machine) and an initramfs holding busybox,
# nbd-client, e2fsprogs and a few coreutils/util-linux tools copied from this machine with their libraries, the
# kernel modules the tests need and the /init that runs a scenario (scripts/kernel-vm/init).
#
# Usage: scripts/kernel-vm/build.sh      prints the directory holding vmlinuz and initramfs.gz
#
# The result is cached under $SPINDLE_KERNEL_VM_CACHE, else /var/cache/spindle-kernel-vm (root) or
# ${XDG_CACHE_HOME:-~/.cache}/spindle-kernel-vm, keyed by the kernel package, the versions of the copied tools and
# these scripts, so a second call returns at once. SPINDLE_KERNEL_DEB=/path/to/linux-image-*.deb uses a kernel
# package already at hand instead of downloading one (offline use).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)

log() { echo "kernel-vm: $*" >&2; }
die() { log "error: $*"; exit 1; }

if [ -n "${SPINDLE_KERNEL_VM_CACHE:-}" ]; then
  cache=$SPINDLE_KERNEL_VM_CACHE
elif [ "$(id -u)" -eq 0 ]; then
  cache=/var/cache/spindle-kernel-vm
else
  cache=${XDG_CACHE_HOME:-$HOME/.cache}/spindle-kernel-vm
fi
mkdir -p "$cache/debs"

# The programs copied into the guest: path on this machine -> the same path in the guest.
guest_programs=(
  /usr/sbin/nbd-client
  /usr/sbin/mkfs.ext4 /usr/sbin/mke2fs /usr/sbin/e2fsck /usr/sbin/fsck.ext4 /usr/sbin/dumpe2fs
  /usr/bin/dd                             # GNU dd: oflag=dsync|sync (FUA, FLUSH) and a throughput figure
  /usr/sbin/blkdiscard /usr/bin/fallocate /usr/sbin/fstrim   # util-linux: blkdiscard -z, fallocate -p|-z
)
# Packages whose version goes into the cache key (they own the programs above, and libc owns the loader).
key_packages=(nbd-client e2fsprogs coreutils util-linux busybox-static libc6)
# Kernel modules loaded in the guest (with whatever they depend on); crc32c is a soft dependency of ext4.
guest_modules=(virtio_pci virtio_net nbd ext4 crc32c_generic)

for tool in busybox cpio gzip xz dpkg-deb apt-get apt-cache flock gcc; do
  command -v "$tool" >/dev/null || die "$tool is missing: run scripts/install-deps.sh"
done
busybox=$(command -v busybox)
# Only the static busybox works in the guest, which has no libraries of its own for it.
if ldd "$busybox" >/dev/null 2>&1; then die "$busybox is not static: install busybox-static (scripts/install-deps.sh)"; fi
for program in "${guest_programs[@]}"; do
  [ -x "$program" ] || die "$program is missing: run scripts/install-deps.sh"
done

# One build at a time per cache; a second caller waits and then finds the result.
exec 9>"$cache/.lock"
flock -w 900 9 || die "timed out waiting for another build to finish ($cache/.lock)"

# Which kernel: the package linux-image-amd64 points at, unless one was given.
if [ -n "${SPINDLE_KERNEL_DEB:-}" ]; then
  [ -f "$SPINDLE_KERNEL_DEB" ] || die "SPINDLE_KERNEL_DEB=$SPINDLE_KERNEL_DEB does not exist"
  kernel_deb=$(cd "$(dirname "$SPINDLE_KERNEL_DEB")" && pwd)/$(basename "$SPINDLE_KERNEL_DEB")
  kernel_id=$(dpkg-deb -f "$kernel_deb" Package Version | tr '\n' ' ')
else
  resolve_kernel() {
    apt-cache depends linux-image-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }'
  }
  kernel_package=$(resolve_kernel || true)
  if [ -z "$kernel_package" ] && [ "$(id -u)" -eq 0 ]; then
    log "apt does not know linux-image-amd64 yet: apt-get update"
    apt-get update -q >&2 || true
    kernel_package=$(resolve_kernel || true)
  fi
  [ -n "$kernel_package" ] || die "cannot resolve linux-image-amd64 with apt-cache (run apt-get update, or set SPINDLE_KERNEL_DEB)"
  kernel_version=$(apt-cache show --no-all-versions "$kernel_package" | awk '$1 == "Version:" { print $2; exit }')
  kernel_id="$kernel_package $kernel_version"
  kernel_deb=""
fi

key_text="$kernel_id
$(dpkg-query -W -f='${Package} ${Version}\n' "${key_packages[@]}" 2>/dev/null)
$(cat "$here/build.sh" "$here/init" "$here/memfill.c" | sha256sum)"
key=$(printf '%s' "$key_text" | sha256sum | cut -c1-16)
out=$cache/$key
if [ -f "$out/ready" ]; then
  echo "$out"
  exit 0
fi

if [ -z "$kernel_deb" ]; then
  kernel_deb=$(find "$cache/debs" -maxdepth 1 -name "${kernel_package}_*.deb" | head -n 1)
  if [ -z "$kernel_deb" ] || [ "$(dpkg-deb -f "$kernel_deb" Version)" != "$kernel_version" ]; then
    log "downloading $kernel_package $kernel_version"
    rm -f "$cache/debs/"*.deb
    # apt-get download writes to the current directory; the sandbox user may not write to the cache.
    (cd "$cache/debs" && apt-get download -q -o APT::Sandbox::User=root "$kernel_package=$kernel_version" >&2) ||
      die "apt-get download $kernel_package failed (network? stale lists: apt-get update)"
    kernel_deb=$(find "$cache/debs" -maxdepth 1 -name "${kernel_package}_*.deb" | head -n 1)
  fi
fi

# extract_vmlinux BZIMAGE OUTPUT: finds the compressed payload in a bzImage and unpacks it into an ELF file.
extract_vmlinux() {
  local image=$1 output=$2 magic tool offset
  for magic in 'xz:\xfd7zXZ\x00' 'zstd:\x28\xb5\x2f\xfd' 'gzip:\x1f\x8b\x08'; do
    tool=${magic%%:*}
    command -v "$tool" >/dev/null || continue
    for offset in $(LC_ALL=C grep -obUaP "${magic#*:}" "$image" | cut -d: -f1 | head -n 4); do
      # Trailing bytes after the stream are expected; a usable result is an ELF file.
      tail -c +$((offset + 1)) "$image" | "$tool" -dc 2>/dev/null >"$output" || true
      if [ "$(head -c 4 "$output" | od -An -c | tr -d ' ')" = '177ELF' ]; then
        return 0
      fi
    done
  done
  rm -f "$output"
  return 1
}

log "building $out from $kernel_id"
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
dpkg-deb -x "$kernel_deb" "$work/kernel"
vmlinuz=$(find "$work/kernel/boot" -name 'vmlinuz-*' | head -n 1)
[ -n "$vmlinuz" ] || die "no vmlinuz in $kernel_deb"
kver=${vmlinuz##*/vmlinuz-}
moddir=$work/kernel/lib/modules/$kver
[ -d "$moddir" ] || die "no modules for $kver in $kernel_deb"

root=$work/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,mnt,run,scenario,lib/modules/"$kver"}

# busybox provides the shell and everything the real programs below do not.
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
  [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done

# Real programs with their shared libraries (and the dynamic loader), at the same paths as on this machine.
copy_file() {
  local source=$1
  mkdir -p "$root$(dirname "$source")"
  cp -L "$source" "$root$source"
}
for program in "${guest_programs[@]}"; do
  copy_file "$program"
  for library in $(ldd "$program" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
    [ -e "$root$library" ] || copy_file "$library"
  done
done
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/"
# memfill: fills more memory than the guest has with known data and checks it (the swap test); static, no libraries.
gcc -O2 -static -o "$root/usr/bin/memfill" "$here/memfill.c" || die "cannot compile memfill.c (gcc and libc6-dev: scripts/install-deps.sh)"
ln -s /proc/mounts "$root/etc/mtab"
echo "root:x:0:0:root:/:/bin/sh" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"

# Kernel modules: each wanted module and, recursively, what its modinfo says it depends on.
declare -A module_path=()
while IFS= read -r path; do
  name=${path##*/}
  name=${name%.ko}
  module_path[${name//-/_}]=$path
done < <(find "$moddir/kernel" -name '*.ko')
declare -A copied=()
add_module() {
  local name=${1//-/_} path depends dependency
  [ -n "${copied[$name]:-}" ] && return 0
  path=${module_path[$name]:-}
  [ -n "$path" ] || die "module $name is not in $kernel_id"
  copied[$name]=1
  mkdir -p "$root/lib/modules/$kver/$(dirname "${path#"$moddir/"}")"
  cp "$path" "$root/lib/modules/$kver/${path#"$moddir/"}"
  depends=$(tr '\0' '\n' <"$path" | grep -a -m 1 '^depends=' | cut -d= -f2 || true)
  for dependency in ${depends//,/ }; do
    add_module "$dependency"
  done
}
for module in "${guest_modules[@]}"; do
  add_module "$module"
done
"$busybox" depmod -b "$root" "$kver"

install -m 0755 "$here/init" "$root/init"
echo "$kernel_id" >"$root/etc/spindle-kernel-vm"

(cd "$root" && find . | cpio -o -H newc -R 0:0 --quiet) | gzip -1 >"$work/initramfs.gz"
mkdir -p "$work/out"
mv "$work/initramfs.gz" "$work/out/"
cp "$vmlinuz" "$work/out/vmlinuz"
# The uncompressed kernel too: QEMU boots it through its PVH entry point, skipping the decompressor, which takes
# many seconds under TCG (and which nested virtualization without VMX, e.g. PVM, cannot run at all).
extract_vmlinux "$vmlinuz" "$work/out/vmlinux" || log "no uncompressed kernel found in $vmlinuz; booting the bzImage"
echo "$kver" >"$work/out/kernel-release"
echo "$kernel_id" >"$work/out/kernel-package"
touch "$work/out/ready"
rm -rf "$out"
mv "$work/out" "$out"
# Older builds (another kernel or tool version) are of no further use.
find "$cache" -mindepth 1 -maxdepth 1 -type d -name '????????????????' ! -name "$key" -exec rm -rf {} +
log "built $out ($(du -sh "$out/initramfs.gz" | cut -f1) initramfs, kernel $kver)"
echo "$out"
