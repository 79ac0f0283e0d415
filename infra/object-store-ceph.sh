#!/usr/bin/env bash
# Start a throw-away single-node Ceph (1 mon + 1 memstore OSD, no mgr) + RADOS Gateway (S3) on loopback,
# for tests, benchmarks and the demo. Needs Debian packages: radosgw ceph-mon ceph-osd.
# usage: infra/object-store-ceph.sh DIR [S3_PORT] [MON_PORT]  -> S3 at http://127.0.0.1:S3_PORT
# credentials: CEPH_ACCESS_KEY / CEPH_SECRET_KEY (default testkey/testsecret); stop: kill $(cat DIR/run/*.pid)
set -euo pipefail
D=$(realpath -m "${1:?dir}"); PORT=${2:-7480}; MONPORT=${3:-3300}
rm -rf "$D"; mkdir -p "$D"/{run,log,mon/ceph-a,osd/ceph-0}
FSID=$(cat /proc/sys/kernel/random/uuid)
cat > "$D/ceph.conf" <<EOF
[global]
fsid = $FSID
mon host = v2:127.0.0.1:$MONPORT
mon initial members = a
public network = 127.0.0.0/8
auth cluster required = none
auth service required = none
auth client required = none
# daemons default to 'secure' mon mode, which needs cephx; allow crc with auth=none
ms mon client mode = crc secure
ms client mode = crc secure
ms bind ipv6 = false
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon max pg per osd = 1000
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = 4294967296
osd max object name len = 460
osd max object namespace len = 64
run dir = $D/run
admin socket = $D/run/\$name.asok
log file = $D/log/\$name.log
pid file = $D/run/\$name.pid
keyring = $D/keyring
mon data = $D/mon/\$cluster-\$id
osd data = $D/osd/\$cluster-\$id
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:$PORT tcp_nodelay=1
rgw data = $D/rgw
EOF
C="-c $D/ceph.conf"
ceph-authtool --create-keyring "$D/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
monmaptool --create --addv a "[v2:127.0.0.1:$MONPORT]" --fsid "$FSID" "$D/monmap" >/dev/null
ceph-mon $C --mkfs -i a --monmap "$D/monmap" --keyring "$D/keyring"
ceph-mon $C -i a
OSDUUID=$(cat /proc/sys/kernel/random/uuid)
ID=$(timeout 30 ceph $C osd new "$OSDUUID")
ceph-osd $C -i "$ID" --mkfs --osd-uuid "$OSDUUID" 2>/dev/null
ceph-osd $C -i "$ID" 2>/dev/null
mkdir -p "$D/rgw"
radosgw $C -n client.rgw.a
for _ in $(seq 1 600); do curl -s -o /dev/null "http://127.0.0.1:$PORT/" && break; sleep 0.1; done
timeout 60 radosgw-admin $C user create --uid=test --display-name=test \
  --access-key="${CEPH_ACCESS_KEY:-testkey}" --secret="${CEPH_SECRET_KEY:-testsecret}" >/dev/null
echo "RGW up: http://127.0.0.1:$PORT  pids: $(cat "$D"/run/*.pid | tr '\n' ' ')"
