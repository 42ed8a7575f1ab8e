#!/usr/bin/env bash
# A throwaway single-node Ceph cluster for tests and benchmarks: one monitor, one OSD on memstore (data in RAM),
# no manager, everything bound to 127.0.0.1 and kept under one directory. Built from Debian's packages
# (ceph-mon ceph-osd ceph-common python3-rados python3-rbd); see docs/rbd.md.
#
#   scripts/ceph-cluster.sh start DIR [--watch PID]   start a cluster in DIR (created; must not hold one already)
#   scripts/ceph-cluster.sh stop DIR                  stop it and delete DIR
#   scripts/ceph-cluster.sh status DIR                exit 0 if both daemons are running
#
# After start: DIR/ceph.conf and DIR/ceph.client.admin.keyring (client id "admin"), and a pool named "rbd"
# initialised for RBD. `--watch PID` stops the cluster when process PID ends (a test run that dies does not leave
# daemons behind). Environment: CEPH_MEMSTORE_BYTES (OSD capacity, default 4 GiB; memstore holds 2-3.5x what is
# written in RAM), CEPH_CLUSTER_MAX_LIFETIME (seconds a watched cluster may live at most, default 14400).
set -euo pipefail

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

[ $# -ge 2 ] || usage
command="$1"
dir="$2"
shift 2

python=/usr/bin/python3 # Debian's python: python3-rados and python3-rbd live there, not in a pyenv python.

# Whether a process is alive: a killed daemon lingers as a zombie for a moment, which kill -0 still reports.
alive() {
  local pid="$1" state
  [ -r "/proc/$pid/stat" ] || return 1
  state="$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
  [ -n "$state" ] && [ "$state" != "Z" ] && [ "$state" != "X" ]
}

# Waits (bounded) until a process is gone.
wait_gone() {
  local pid="$1" tenths="$2"
  for _ in $(seq "$tenths"); do
    alive "$pid" || return 0
    sleep 0.1
  done
  return 1
}

# Stops the daemons, the OSD first: an OSD that outlives its monitor waits out a 5 s timeout. The OSD is killed
# outright: memstore would otherwise write everything it holds to disk on the way down, and the data is thrown
# away anyway.
stop_cluster() {
  local d="$1" pid
  if [ -f "$d/watch.pid" ]; then
    pid="$(cat "$d/watch.pid")"
    [ "$pid" != "$$" ] && [ "$pid" != "$PPID" ] && alive "$pid" && kill "$pid" 2>/dev/null || true
  fi

  if [ -f "$d/osd.pid" ]; then
    pid="$(cat "$d/osd.pid")"
    if alive "$pid"; then
      kill -9 "$pid" 2>/dev/null || true
      wait_gone "$pid" 100 || echo "ceph-cluster: osd (pid $pid) did not exit" >&2
    fi
  fi

  if [ -f "$d/mon.pid" ]; then
    pid="$(cat "$d/mon.pid")"
    if alive "$pid"; then
      kill -TERM "$pid" 2>/dev/null || true
      wait_gone "$pid" 50 || { kill -9 "$pid" 2>/dev/null || true; wait_gone "$pid" 50 || true; }
    fi
  fi
}

case "$command" in
  stop)
    [ -f "$dir/ceph.conf" ] || { echo "ceph-cluster: no cluster in $dir" >&2; exit 1; }
    stop_cluster "$dir"
    rm -rf "$dir"
    exit 0
    ;;
  status)
    [ -f "$dir/mon.pid" ] && [ -f "$dir/osd.pid" ] && alive "$(cat "$dir/mon.pid")" && alive "$(cat "$dir/osd.pid")"
    exit $?
    ;;
  start) ;;
  *) usage ;;
esac

watch_pid=""
while [ $# -gt 0 ]; do
  case "$1" in
    --watch) watch_pid="$2"; shift 2 ;;
    *) usage ;;
  esac
done

for tool in ceph-mon ceph-osd ceph-authtool monmaptool; do
  command -v "$tool" >/dev/null || [ -x "/usr/bin/$tool" ] || {
    echo "ceph-cluster: $tool is missing: run scripts/install-deps.sh (ceph-mon ceph-osd ceph-common)" >&2
    exit 1
  }
done
"$python" -c 'import rados, rbd' 2>/dev/null || {
  echo "ceph-cluster: python3-rados / python3-rbd are missing: run scripts/install-deps.sh" >&2
  exit 1
}

if [ -e "$dir/ceph.conf" ]; then
  echo "ceph-cluster: $dir already holds a cluster (stop it first)" >&2
  exit 1
fi
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
mkdir -p "$dir/run" "$dir/log" "$dir/crash" "$dir/mon" "$dir/osd"

# If anything below fails, leave nothing running.
trap 'status=$?; if [ $status -ne 0 ]; then echo "ceph-cluster: start failed; logs in $dir/log" >&2; stop_cluster "$dir"; fi' EXIT

# Two free loopback ports for the monitor (msgr2 and the legacy protocol).
read -r port2 port1 < <("$python" - <<'EOF'
import socket
sockets = []
for _ in range(2):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    sockets.append(s)
print(*(s.getsockname()[1] for s in sockets))
EOF
)

fsid="$("$python" -c 'import uuid; print(uuid.uuid4())')"
osd_uuid="$("$python" -c 'import uuid; print(uuid.uuid4())')"
memstore_bytes="${CEPH_MEMSTORE_BYTES:-4294967296}"

cat >"$dir/ceph.conf" <<EOF
# Throwaway test cluster written by scripts/ceph-cluster.sh: loopback only, single copy, data in RAM.
[global]
fsid = $fsid
mon_host = [v2:127.0.0.1:$port2,v1:127.0.0.1:$port1]
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_ipv6 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
run_dir = $dir/run
crash_dir = $dir/crash
log_file = $dir/log/\$name.log
mon_cluster_log_file = $dir/log/cluster.log
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
mon_warn_on_insecure_global_id_reclaim = false
mon_warn_on_insecure_global_id_reclaim_allowed = false
mon_data_avail_warn = 1
mon_data_avail_crit = 0
# Each map change otherwise waits about a second.
paxos_propose_interval = 0.1

[mon]
mon_data = $dir/mon
admin_socket = $dir/run/\$name.asok

[osd]
keyring = $dir/ceph.\$name.keyring
osd_objectstore = memstore
osd_data = $dir/osd
memstore_device_bytes = $memstore_bytes
admin_socket = $dir/run/\$name.asok

[client]
keyring = $dir/ceph.\$name.keyring
# Clients sharing one name would collide on one admin socket: one per process and per client instance.
admin_socket = $dir/run/\$name.\$pid.\$cctid.asok
log_file = $dir/log/\$name.\$pid.log
EOF

authtool=(ceph-authtool)
"${authtool[@]}" --create-keyring "$dir/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
"${authtool[@]}" --create-keyring "$dir/ceph.client.admin.keyring" --gen-key -n client.admin \
  --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
"${authtool[@]}" --create-keyring "$dir/ceph.osd.0.keyring" --gen-key -n osd.0 \
  --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *' >/dev/null
# The monitor's initial keyring seeds its auth database: admin and the OSD are known from the first second.
cp "$dir/mon.keyring" "$dir/mon-seed.keyring"
"${authtool[@]}" "$dir/mon-seed.keyring" --import-keyring "$dir/ceph.client.admin.keyring" >/dev/null
"${authtool[@]}" "$dir/mon-seed.keyring" --import-keyring "$dir/ceph.osd.0.keyring" >/dev/null

monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port2,v1:127.0.0.1:$port1]" "$dir/monmap" >/dev/null
ceph-mon -c "$dir/ceph.conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon-seed.keyring" \
  >"$dir/log/mon-mkfs.out" 2>&1
rm -f "$dir/mon-seed.keyring"

# setsid: the daemons must not die with the terminal or test process group that started the script; --watch or
# `stop` ends them.
setsid ceph-mon -f -c "$dir/ceph.conf" -i a >"$dir/log/mon.out" 2>&1 </dev/null &
echo $! >"$dir/mon.pid"

# Register osd.0 in the OSD map. One python process with one librados connection does what would otherwise be
# several `ceph` commands at 0.6-0.7 s each.
"$python" - "$dir" "$osd_uuid" <<'EOF'
import json, sys
import rados
d, osd_uuid = sys.argv[1], sys.argv[2]
cluster = rados.Rados(conffile=f"{d}/ceph.conf", rados_id="admin", conf={"client_mount_timeout": "20", "rados_mon_op_timeout": "20"})
cluster.connect(timeout=20)
ret, out, err = cluster.mon_command(json.dumps({"prefix": "osd new", "uuid": osd_uuid, "id": 0}), b"")
if ret != 0:
    sys.exit(f"osd new failed: {ret} {err}")
cluster.shutdown()
EOF

ceph-osd -c "$dir/ceph.conf" -i 0 --mkfs --no-mon-config --osd-uuid "$osd_uuid" >"$dir/log/osd-mkfs.out" 2>&1
setsid ceph-osd -f -c "$dir/ceph.conf" -i 0 >"$dir/log/osd.out" 2>&1 </dev/null &
echo $! >"$dir/osd.pid"

# Wait (bounded) until the OSD is up: a write sent earlier can stall for seconds. Then create the rbd pool and
# initialise it; pool_init writes an object, so it also proves the placement groups are active.
"$python" - "$dir" <<'EOF'
import json, sys, time
import rados, rbd
d = sys.argv[1]
cluster = rados.Rados(conffile=f"{d}/ceph.conf", rados_id="admin",
                      conf={"client_mount_timeout": "20", "rados_mon_op_timeout": "20", "rados_osd_op_timeout": "30"})
cluster.connect(timeout=20)
deadline = time.monotonic() + 30
while True:
    ret, out, err = cluster.mon_command(json.dumps({"prefix": "osd dump", "format": "json"}), b"")
    if ret == 0 and any(o["osd"] == 0 and o["up"] == 1 for o in json.loads(out)["osds"]):
        break
    if time.monotonic() > deadline:
        sys.exit("osd.0 did not come up within 30 s")
    time.sleep(0.1)
for command in ({"prefix": "osd pool create", "pool": "rbd", "pg_num": 8},
                {"prefix": "osd pool application enable", "pool": "rbd", "app": "rbd"}):
    ret, out, err = cluster.mon_command(json.dumps(command), b"")
    if ret != 0:
        sys.exit(f"{command['prefix']} failed: {ret} {err}")
with cluster.open_ioctx("rbd") as ioctx:
    rbd.RBD().pool_init(ioctx, False)
cluster.shutdown()
EOF

if [ -n "$watch_pid" ]; then
  max_lifetime="${CEPH_CLUSTER_MAX_LIFETIME:-14400}"
  script="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
  setsid bash -c '
    pid="$1"; dir="$2"; script="$3"; limit="$4"; start=$SECONDS
    while [ -r "/proc/$pid/stat" ] && [ $((SECONDS - start)) -lt "$limit" ]; do sleep 1; done
    [ -f "$dir/ceph.conf" ] && "$script" stop "$dir"
  ' watchdog "$watch_pid" "$dir" "$script" "$max_lifetime" >/dev/null 2>&1 </dev/null &
  echo $! >"$dir/watch.pid"
fi

trap - EXIT
echo "ceph-cluster: running in $dir (monitor 127.0.0.1:$port2, pool rbd); stop with: $0 stop $dir" >&2
echo "CEPH_CONF=$dir/ceph.conf"
