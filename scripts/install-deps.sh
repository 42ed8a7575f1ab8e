#!/usr/bin/env bash
# Installs what the tests need from Debian's packages: the peers Spindle is proven against and the tools the
# tests drive, then the Debian 13 root with the peers that speak NBD extended headers (scripts/trixie-root.sh).
# Idempotent and quick when everything is present. Needs root (or sudo).
set -euo pipefail

packages=(
  qemu-utils        # qemu-img, qemu-io, qemu-nbd
  libnbd-bin        # nbdinfo, nbdcopy, nbdsh
  python3-libnbd    # the nbd module for nbdsh and test scripts (Debian's /usr/bin/python3)
  nbdkit            # peer server for the client tests
  nbd-server        # the reference server, peer for the client tests
  fio               # benchmark (nbd engine)
  fuse3             # spindle mount
  e2fsprogs         # mkfs.ext4 / fsck for end-to-end device tests
  mount             # losetup, mount, umount: spindle attach and the device tests
  util-linux        # fallocate, fstrim, blockdev for the device tests
  gdisk parted      # sgdisk and parted make the GPT and MBR disk images the partition layer is tested on
  openssl           # certificates for the TLS tests
  gnutls-bin        # certtool, as nbdkit and qemu users make certificates
  iproute2 procps psmisc
  # Ceph: a throwaway cluster for the RBD backend's tests (scripts/ceph-cluster.sh), the client libraries the
  # backend loads, python3-rbd to read images back independently, and qemu's rbd driver (the benchmark's peer).
  ceph-mon ceph-osd ceph-mgr ceph-common librados2 librbd1 python3-rados python3-rbd qemu-block-extra
  qemu-system-x86   # boots a Debian kernel with nbd.ko for the kernel client tests (scripts/kernel-vm)
  cpio              # packs that VM's initramfs
  xz-utils          # unpacks its kernel (booted uncompressed)
  busybox-static    # the VM's userland
  nbd-client        # copied into the VM: the real kernel client's userspace half
  debootstrap       # builds the Debian 13 root of extended-header peers (scripts/trixie-root.sh)
  # Links the Native AOT spindle executable (./spindle, scripts/test.sh): the ILCompiler calls clang if present,
  # else gcc, and links against glibc and zlib (-lz, though nothing of it stays in the binary).
  gcc libc6-dev zlib1g-dev
  afl++             # afl-fuzz: drives the SharpFuzz-instrumented parsers (scripts/fuzz.sh)
  # Operating Spindle (tests/Spindle.Ops.Tests): a real Prometheus scrapes `spindle serve --metrics` and promtool
  # checks the exposition; headless Chromium loads the status page; systemd's own tools (systemd-socket-activate,
  # systemd-analyze verify) run the units; jq runs nbdinfo-style filters over `spindle info --json`.
  prometheus        # prometheus, promtool
  chromium          # headless: the status page
  systemd           # systemd-socket-activate, systemd-analyze
  jq
  man-db            # man: the installed manual pages are rendered in a test
)

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
else
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Debian 12 has neither libnbd >= 1.18 nor qemu >= 8.2: the extended-header interop tests run those peers from a
# Debian 13 root, built once and cached (quick when present).
trixie_root=$($SUDO "$(dirname "$0")/trixie-root.sh")
echo "install-deps: trixie root at $trixie_root"
