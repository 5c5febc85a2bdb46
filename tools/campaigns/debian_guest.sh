#!/usr/bin/env bash
# A real Debian 12 guest (debootstrap, systemd, qemu-ga, sqlite3) under SQLite write load, for the hand test of
# issue 24: back it up running with `rpfs backup --libvirt`, restore it with `--to-libvirt`, check its database.
# The tiny test guest of tools/guest (busybox initramfs) cannot run an application; this one boots Debian's
# own systemd from an ext4 root disk (qcow2), direct kernel boot, TCG (this host's /dev/kvm hangs guests).
#
#   debian_guest.sh build DIR            debootstrap bookworm into DIR/root.raw (3 GiB ext4) -> DIR/root.qcow2,
#                                        kernel and initrd copied to DIR (several minutes; no libvirt needed)
#   debian_guest.sh files ROOT           only write the guest's files (load, checks, agent -F) into a debootstrapped ROOT
#   debian_guest.sh define NAME DIR      define domain NAME (1 GiB, 1 vCPU, agent channel) on DIR/root.qcow2
#   debian_guest.sh wait NAME [SECONDS]  wait until the guest agent answers guest-ping; prints the seconds
#   debian_guest.sh exec NAME CMD        run `sh -c CMD` in the guest (guest-exec); its output, its exit status
#   debian_guest.sh load NAME            start the SQLite write load in the guest (systemctl start db-load)
#   debian_guest.sh load-wal NAME        the same load through one long-lived connection (db-load-wal, installed
#                                        through the agent, so it also works on an image built before it existed)
#   debian_guest.sh check NAME           the database's integrity_check and the load's invariant (exit 1 if bad)
#   debian_guest.sh remove NAME          destroy and undefine NAME (with checkpoint and snapshot metadata)
#
# The load (/usr/local/sbin/db-load, unit db-load.service, not enabled: a restored copy boots with the database
# as backed up): /var/db/load.db in WAL mode; each transaction inserts 100 rows of batch n+1 and adds them to the
# one-row table counter (batches, nrows, total). Invariant at every commit: counter.nrows = count(rows),
# counter.total = sum(rows.val), counter.batches = max(rows.batch), every batch 1..batches has 100 rows.
# Run guests under `flock /tmp/rpfs-libvirt.lock` (one guest at a time on this shared host).
set -euo pipefail
virsh=(virsh -q -c qemu:///system)
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

now() { echo "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

load_wal_script() {   # one long-lived connection: committed frames stay in the WAL until SQLite checkpoints them
  cat <<'EOF'
#!/bin/sh
# SQLite write load through ONE connection (a stream of transactions into one sqlite3), so that at a backup the
# WAL holds committed transactions not yet checkpointed into load.db (db-load's short connections checkpoint
# and empty the WAL each time they close).
DB=/var/db/load.db
mkdir -p /var/db
sqlite3 "$DB" "PRAGMA journal_mode=WAL;
CREATE TABLE IF NOT EXISTS rows(id INTEGER PRIMARY KEY, batch INTEGER NOT NULL, val INTEGER NOT NULL, pad BLOB);
CREATE INDEX IF NOT EXISTS rows_batch ON rows(batch);
CREATE TABLE IF NOT EXISTS counter(id INTEGER PRIMARY KEY CHECK (id = 1), batches INTEGER, nrows INTEGER, total INTEGER);
INSERT OR IGNORE INTO counter VALUES (1, 0, 0, 0);" >/dev/null
{ echo "PRAGMA busy_timeout=10000;"
  while :; do
    echo "BEGIN IMMEDIATE; WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 100) INSERT INTO rows(batch, val, pad) SELECT (SELECT batches + 1 FROM counter), abs(random() % 1000000), randomblob(400) FROM s; UPDATE counter SET batches = batches + 1, nrows = nrows + 100, total = total + (SELECT sum(val) FROM rows WHERE batch = (SELECT batches + 1 FROM counter)); COMMIT;"
  done; } | sqlite3 "$DB" >/dev/null
EOF
}

write_guest_files() {   # $1: the root folder
  local r=$1
  echo rpfs-hand > "$r/etc/hostname"
  echo '/dev/vda / ext4 defaults 0 1' > "$r/etc/fstab"
  chroot "$r" passwd -d root >/dev/null
  # Debian's qemu-guest-agent.service is started by udev when the agent's virtio port appears; -F runs
  # /etc/qemu/fsfreeze-hook (and its fsfreeze-hook.d) at freeze and thaw.
  mkdir -p "$r/etc/systemd/system/qemu-guest-agent.service.d"
  printf '[Service]\nExecStart=\nExecStart=/usr/sbin/qemu-ga -F\n' \
    > "$r/etc/systemd/system/qemu-guest-agent.service.d/fsfreeze-hook.conf"
  mkdir -p "$r/etc/qemu/fsfreeze-hook.d"
  cat > "$r/etc/qemu/fsfreeze-hook.d/log.sh" <<'EOF'
#!/bin/sh
# Records each freeze and thaw the agent ran the hook for (the hand test reads it).
echo "$(date -u +%FT%T.%N) $1" >> /var/log/fsfreeze-hook.events
EOF
  chmod 755 "$r/etc/qemu/fsfreeze-hook.d/log.sh"
  mkdir -p "$r/usr/local/sbin"
  cat > "$r/usr/local/sbin/db-load" <<'EOF'
#!/bin/sh
# SQLite write load: transactions of 100 rows each, with a counter row kept in step inside the transaction.
DB=/var/db/load.db
mkdir -p /var/db
sqlite3 "$DB" "PRAGMA journal_mode=WAL;
CREATE TABLE IF NOT EXISTS rows(id INTEGER PRIMARY KEY, batch INTEGER NOT NULL, val INTEGER NOT NULL, pad BLOB);
CREATE INDEX IF NOT EXISTS rows_batch ON rows(batch);
CREATE TABLE IF NOT EXISTS counter(id INTEGER PRIMARY KEY CHECK (id = 1), batches INTEGER, nrows INTEGER, total INTEGER);
INSERT OR IGNORE INTO counter VALUES (1, 0, 0, 0);" >/dev/null
while :; do
  sqlite3 "$DB" "PRAGMA busy_timeout=10000; BEGIN IMMEDIATE;
WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 100)
INSERT INTO rows(batch, val, pad) SELECT (SELECT batches + 1 FROM counter), abs(random() % 1000000), randomblob(400) FROM s;
UPDATE counter SET batches = batches + 1, nrows = nrows + 100,
  total = total + (SELECT sum(val) FROM rows WHERE batch = (SELECT batches + 1 FROM counter));
COMMIT;" >/dev/null || echo "db-load: a transaction failed" >&2
done
EOF
  chmod 755 "$r/usr/local/sbin/db-load"
  cat > "$r/usr/local/sbin/db-check" <<'EOF'
#!/bin/sh
# integrity_check, then the load's invariant: prints "invariant ok ..." or the mismatching numbers.
DB=/var/db/load.db
sqlite3 "$DB" 'PRAGMA integrity_check;'
sqlite3 "$DB" "SELECT CASE WHEN c.nrows = (SELECT count(*) FROM rows) AND c.total = (SELECT coalesce(sum(val), 0) FROM rows)
  AND c.batches = (SELECT coalesce(max(batch), 0) FROM rows)
  AND NOT EXISTS (SELECT 1 FROM rows GROUP BY batch HAVING count(*) <> 100)
  THEN 'invariant ok' ELSE 'invariant BROKEN' END,
  'batches=' || c.batches, 'nrows=' || c.nrows, 'count=' || (SELECT count(*) FROM rows),
  'total=' || c.total, 'sum=' || (SELECT coalesce(sum(val), 0) FROM rows) FROM counter c;"
EOF
  chmod 755 "$r/usr/local/sbin/db-check"
  load_wal_script > "$r/usr/local/sbin/db-load-wal"
  chmod 755 "$r/usr/local/sbin/db-load-wal"
  cat > "$r/etc/systemd/system/db-load.service" <<'EOF'
[Unit]
Description=SQLite write load (rpfs hand test)
[Service]
ExecStart=/usr/local/sbin/db-load
EOF
  # Less to do at each boot under TCG.
  local t
  for t in apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer; do
    ln -sf /dev/null "$r/etc/systemd/system/$t"
  done
}

build() {
  local dir=$1 root t0
  mkdir -p "$dir"
  root=$(mktemp -d /tmp/rpfs-test-hand-root.XXXXXX)
  truncate -s 3G "$dir/root.raw"
  mkfs.ext4 -q -F "$dir/root.raw"
  mount -o loop "$dir/root.raw" "$root"
  trap 'umount "'"$root"'" 2>/dev/null; rmdir "'"$root"'"' EXIT
  t0=$(now)
  debootstrap --include=systemd-sysv,qemu-guest-agent,sqlite3,linux-image-amd64,e2fsprogs \
    bookworm "$root" "$mirror" > "$dir/debootstrap.log" 2>&1
  echo "debootstrap: $(since "$t0") s"
  write_guest_files "$root"
  cp "$root"/boot/vmlinuz-* "$dir/vmlinuz"
  cp "$root"/boot/initrd.img-* "$dir/initrd.img"
  umount "$root"; rmdir "$root"; trap - EXIT
  e2fsck -fn "$dir/root.raw" >/dev/null
  t0=$(now)
  qemu-img convert -f raw -O qcow2 "$dir/root.raw" "$dir/root.qcow2"
  rm "$dir/root.raw"
  echo "qcow2: $(since "$t0") s, $(du -h "$dir/root.qcow2" | cut -f1)"
}

define() {
  local name=$1 dir; dir=$(cd "$2" && pwd)
  "${virsh[@]}" define /dev/stdin <<EOF
<domain type='qemu'>
  <name>$name</name>
  <memory unit='MiB'>1024</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$dir/vmlinuz</kernel>
    <initrd>$dir/initrd.img</initrd>
    <cmdline>root=/dev/vda rw console=ttyS0</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$dir/root.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <serial type='pty'>
      <log file='$dir/console-$name.log' append='off'/>
      <target port='0'/>
    </serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <interface type='user'><model type='virtio'/></interface>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
}

agent() { "${virsh[@]}" qemu-agent-command "$1" "$2" --timeout "${3:-10}"; }

wait_agent() {
  local name=$1 limit=${2:-600} t0 delay=1
  t0=$(now)
  until agent "$name" '{"execute":"guest-ping"}' 5 >/dev/null 2>&1; do
    if awk -v s="$(since "$t0")" -v l="$limit" 'BEGIN { exit !(s > l) }'; then
      echo "$name: agent did not answer within $limit s" >&2; return 1
    fi
    sleep "$delay"
  done
  echo "agent answered after $(since "$t0") s"
}

gexec() {   # run sh -c "$2" in the guest, wait (bounded) for it, print its output, return its status
  local name=$1 cmd=$2 limit=${3:-300} pid st t0
  pid=$(agent "$name" "$(jq -cn --arg c "$cmd" \
    '{execute:"guest-exec",arguments:{path:"/bin/sh",arg:["-c",$c],"capture-output":true}}')" | jq -r .return.pid)
  t0=$(now)
  while :; do
    st=$(agent "$name" "{\"execute\":\"guest-exec-status\",\"arguments\":{\"pid\":$pid}}")
    [ "$(jq -r .return.exited <<<"$st")" = true ] && break
    if awk -v s="$(since "$t0")" -v l="$limit" 'BEGIN { exit !(s > l) }'; then
      echo "$name: '$cmd' did not finish within $limit s" >&2; return 124
    fi
    sleep 0.5
  done
  jq -r '.return["out-data"] // empty' <<<"$st" | base64 -d
  jq -r '.return["err-data"] // empty' <<<"$st" | base64 -d >&2
  return "$(jq -r '.return.exitcode // 255' <<<"$st")"
}

remove() {
  "${virsh[@]}" destroy "$1" >/dev/null 2>&1 || true
  "${virsh[@]}" undefine "$1" --checkpoints-metadata --snapshots-metadata >/dev/null 2>&1 || true
}

case "${1:-}" in
  build) build "$2" ;;
  files) write_guest_files "$2" ;;
  define) define "$2" "$3" ;;
  wait) wait_agent "$2" "${3:-600}" ;;
  exec) gexec "$2" "$3" "${4:-300}" ;;
  load) gexec "$2" 'systemctl start db-load.service && systemctl is-active db-load.service' ;;
  load-wal) gexec "$2" "echo $(load_wal_script | base64 -w0) | base64 -d > /usr/local/sbin/db-load-wal &&
                        chmod 755 /usr/local/sbin/db-load-wal && systemd-run --unit=db-load-wal /usr/local/sbin/db-load-wal" ;;
  check) out=$(gexec "$2" /usr/local/sbin/db-check); echo "$out"
         grep -qx ok <<<"$out" && grep -q 'invariant ok' <<<"$out" ;;
  remove) remove "$2" ;;
  *) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
