#!/usr/bin/env bash
# Boots the kernel-client VM (scripts/kernel-vm/build.sh builds it on first use) with a scenario and prints its
# serial console; the VM powers itself off when the scenario ends and is killed at the time limit otherwise.
#
# Usage: scripts/kernel-vm/run.sh [--timeout SECONDS] [--cpus N] [--memory SIZE] [--initrd-extra FILE]... SCENARIO_DIR
#   SCENARIO_DIR holds scenario.sh (sourced by the guest's /init, see scripts/kernel-vm/init for its helpers)
#   and any files it needs; the guest sees the directory as /scenario.
#   The guest reaches the host's 127.0.0.1 as 10.0.2.2 (QEMU user-mode networking), so the server under test
#   listens on loopback only. Exit status: 0 when the VM powered off by itself, 124 when it was killed at the limit.
#   --initrd-extra adds a compressed cpio archive (e.g. from pack.sh: the spindle executable, fio) to the initramfs.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
limit=120
cpus=1
memory=512M
extras=()
while [ $# -gt 0 ]; do
  case $1 in
    --timeout) limit=$2; shift 2 ;;
    --cpus) cpus=$2; shift 2 ;;
    --memory) memory=$2; shift 2 ;;
    --initrd-extra) [ -f "$2" ] || { echo "run.sh: $2 does not exist" >&2; exit 2; }; extras+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    -*) echo "run.sh: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
[ $# -eq 1 ] || { echo "usage: run.sh [--timeout SECONDS] [--cpus N] [--memory SIZE] [--initrd-extra FILE]... SCENARIO_DIR" >&2; exit 2; }
scenario=$1
[ -f "$scenario/scenario.sh" ] || { echo "run.sh: $scenario/scenario.sh does not exist" >&2; exit 2; }

qemu=$(command -v qemu-system-x86_64) || { echo "run.sh: qemu-system-x86_64 is missing: run scripts/install-deps.sh" >&2; exit 1; }
vm=$("$here/build.sh")
kernel=$vm/vmlinux
[ -f "$kernel" ] || kernel=$vm/vmlinuz

work=$(mktemp -d)
qemu_pid=""
cleanup() {
  stop_vm
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 143' TERM INT HUP

# The scenario becomes a second initramfs segment: the kernel unpacks concatenated archives one after the other.
mkdir -p "$work/pack/scenario"
cp -R "$scenario/." "$work/pack/scenario/"
(cd "$work/pack" && find scenario | cpio -o -H newc -R 0:0 --quiet) | gzip -1 >"$work/scenario.gz"
cat "$vm/initramfs.gz" ${extras[@]+"${extras[@]}"} "$work/scenario.gz" >"$work/initrd"

# start_vm ACCEL LIMIT INITRD CPUS: boots QEMU in the background (its console on stdout), sets qemu_pid.
# setpriv --pdeathsig: if this script dies without its trap running (SIGKILL), timeout and then QEMU die with it.
start_vm() {
  local accel_options
  if [ "$1" = kvm ]; then accel_options=(-enable-kvm -cpu host); else accel_options=(-accel tcg); fi
  # The guest watchdog (spindle.timeout) fires a little before the hard limit, so a stuck scenario still reports.
  local guest_limit=$(($2 > 20 ? $2 - 10 : $2))
  setpriv --pdeathsig KILL timeout --kill-after=5 "$2" \
    setpriv --pdeathsig KILL "$qemu" \
      "${accel_options[@]}" -machine pc -m "$memory" -smp "$4" \
      -nographic -no-reboot -monitor none -serial stdio -nodefaults \
      -kernel "$kernel" -initrd "$3" \
      -append "console=ttyS0 panic=-1 loglevel=4 rdinit=/init spindle.timeout=$guest_limit" \
      -netdev user,id=net0 -device virtio-net-pci,netdev=net0,romfile= \
      </dev/null &
  qemu_pid=$!
}

stop_vm() {
  if [ -n "$qemu_pid" ]; then
    kill -TERM "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
    qemu_pid=""
  fi
}

# KVM is used when it can boot the guest: /dev/kvm alone does not prove it (nested hypervisors without VMX, such as
# PVM, expose /dev/kvm but cannot run a stock kernel). The answer is probed once per host boot and remembered.
probe_kvm() {
  local log=$work/probe.log verdict=tcg
  # With working KVM the guest boots in a few seconds; one that needs longer is better run under TCG anyway.
  start_vm kvm 30 "$vm/initramfs.gz" 1 >"$log" 2>&1
  for _ in $(seq 1 125); do
    if grep -q '@@spindle booted' "$log"; then verdict=kvm; break; fi
    if grep -q -E 'KVM internal error|emulation failure|failed to initialize kvm' "$log"; then break; fi
    kill -0 "$qemu_pid" 2>/dev/null || break
    sleep 0.2
  done
  stop_vm
  if [ "$verdict" = tcg ]; then
    echo "run.sh: KVM cannot boot the guest kernel on this host, using TCG (slower); the probe said:" >&2
    grep -a -E -m 3 'KVM|error|failure' "$log" | sed 's/^/run.sh:   /' >&2 || true
  fi
  echo "$verdict"
}

choose_accel() {
  case ${SPINDLE_KERNEL_VM_ACCEL:-auto} in
    kvm|tcg) echo "$SPINDLE_KERNEL_VM_ACCEL"; return ;;
    auto) ;;
    *) echo "run.sh: SPINDLE_KERNEL_VM_ACCEL must be kvm, tcg or auto" >&2; exit 2 ;;
  esac
  if ! [ -r /dev/kvm ] || ! [ -w /dev/kvm ]; then
    echo "run.sh: /dev/kvm is not usable, using TCG emulation (slower)" >&2
    echo tcg
    return
  fi
  local verdict_file
  verdict_file=$(dirname "$vm")/accel-$(cat /proc/sys/kernel/random/boot_id)
  (
    flock -w 120 9 || exit 1
    [ -s "$verdict_file" ] || { rm -f "$(dirname "$vm")"/accel-*; probe_kvm >"$verdict_file.new" && mv "$verdict_file.new" "$verdict_file"; }
  ) 9>"$(dirname "$vm")/.accel.lock"
  cat "$verdict_file" 2>/dev/null || echo tcg
}

accel=$(choose_accel)
start_vm "$accel" "$limit" "$work/initrd" "$cpus"
status=0
wait "$qemu_pid" || status=$?
qemu_pid=""
if [ "$status" -eq 124 ]; then
  echo "run.sh: the VM did not power off within $limit s and was killed" >&2
fi
exit "$status"
