#!/bin/bash
# Runs inside the systemd guest (scripts/build-systemd-guest), as root, started by the
# rexecd-vmtest unit at boot. The project is at /mnt/proj (read-only), the wheels and
# this script's results at /mnt/out. Prints one "CHECK ok|FAIL NAME detail" line per
# check; tests/vm/test_systemd.py asserts on them. Every wait is a poll with a deadline
# scaled by SLOW (set by the host test from REXECD_TEST_SLOW).
set -u
SLOW=${SLOW:-20}
SOCK=/run/rexecd/rexecd.sock
RX=/opt/rexecd/bin/rexecd
STATE=/var/lib/rexecd
fails=0

check() {  # check NAME COMMAND...: runs COMMAND, reports its outcome
    local name=$1
    shift
    if "$@"; then
        echo "CHECK ok $name"
    else
        echo "CHECK FAIL $name"
        fails=$((fails + 1))
    fi
}

until_true() {  # until_true SECONDS COMMAND...: poll COMMAND (each second) until it succeeds
    local deadline=$((SECONDS + $1 * SLOW))
    shift
    until "$@"; do
        [ "$SECONDS" -ge "$deadline" ] && return 1
        sleep 1
    done
}

api() {  # api METHOD PATH [JSON]: the response body on stdout
    local args=(-sS --unix-socket "$SOCK" -m $((30 * SLOW)) -X "$1" -H "Authorization: Bearer $TOKEN")
    [ $# -ge 3 ] && args+=(-H 'Content-Type: application/json' -d "$3")
    curl "${args[@]}" "http://rexecd$2"
}

field() {  # field NAME: NAME of the JSON object on stdin
    /opt/rexecd/bin/python -c "import json,sys; print(json.load(sys.stdin).get('$1'))"
}

status_of() { api GET "/api/containers/$1" | field status; }
is_running() { [ "$(status_of "$1")" = running ]; }
init_pid() {
    /opt/rexecd/bin/python -c "import sqlite3; print(sqlite3.connect('file:$STATE/state.db?mode=ro', uri=True).execute(\"SELECT pid FROM containers WHERE name = '$1'\").fetchone()[0])"
}
exec_hi() { api POST /api/containers/vmc/exec '{"command": "echo hi"}' | grep -q hi; }
is_stopped() { [ "$(status_of vmc)" = stopped ]; }
service_state() { systemctl show -p ActiveState --value rexecd.service; }
service_is() { [ "$(service_state)" = "$1" ]; }

echo "guest: $(uname -r), systemd $(systemctl --version | head -n1 | cut -d' ' -f2), cgroup2 at $(awk '$3=="cgroup2"{print $2}' /proc/self/mounts), up $(cut -d' ' -f1 /proc/uptime)s"
start=$SECONDS

# ---- install (twice: idempotent) and the units verify
check install /mnt/proj/scripts/install --wheels /mnt/out/wheels
check install_again /mnt/proj/scripts/install --wheels /mnt/out/wheels
check version_runs "$RX" --version
check config_written test -s /etc/rexecd/rexecd.yaml
check group_exists getent group rexecd
check analyze_verify systemd-analyze verify /etc/systemd/system/rexecd.service /etc/systemd/system/rexecd.socket
check socket_listening systemctl --quiet is-active rexecd.socket
check service_not_started_yet service_is inactive
echo "timing: installed at $((SECONDS - start))s"

# ---- an admin, an image; then the first request starts the daemon
"$RX" image import --state-dir "$STATE" /mnt/proj/build/test-images/busybox.tar >/dev/null
TOKEN=$("$RX" token create --state-dir "$STATE" --user admin --tier enterprise --scopes read,write,admin)
t0=$SECONDS
health=$(api GET /health)
echo "timing: first request answered after $((SECONDS - t0))s"
check first_request_activates test "$(echo "$health" | field status)" = ok
check service_active service_is active
check notify_status until_true 30 sh -c 'systemctl show -p StatusText --value rexecd.service | grep -q "containers in all"'
echo "status: $(systemctl show -p StatusText --value rexecd.service)"
check watchdog_set sh -c '[ "$(systemctl show -p WatchdogUSec --value rexecd.service)" != 0 ]'

# A non-root member of the rexecd group reaches the socket.
useradd -m -G rexecd alice 2>/dev/null
check group_member_uses_socket runuser -u alice -- curl -sSf -o /dev/null -m $((30 * SLOW)) --unix-socket "$SOCK" http://rexecd/health

# ---- a container
api POST /api/containers '{"image": "busybox", "name": "vmc"}' >/dev/null
check container_running until_true 120 is_running vmc
CID=$(api GET /api/containers/vmc | field id)
PID=$(init_pid vmc)
echo "container: $CID init $PID, cgroup $(cat /proc/"$PID"/cgroup)"
# Outside the unit's cgroup: a delegated unit could not be started again otherwise.
check container_cgroup_outside_unit grep -q "^0::/rexecd/$CID\$" "/proc/$PID/cgroup"
echo "daemon cgroup: $(cat /proc/"$(systemctl show -p MainPID --value rexecd.service)"/cgroup)"

# ---- restart: the container keeps running and is re-adopted
t0=$SECONDS
check restart systemctl restart rexecd.service
echo "timing: restart took $((SECONDS - t0))s"
check restart_active service_is active
check restart_container_alive test -d "/proc/$PID"
check restart_same_init test "$(init_pid vmc)" = "$PID"
check restart_still_running is_running vmc
check restart_readopted until_true 30 sh -c "journalctl -u rexecd.service -o cat | grep -q 'container adopt: vmc .* user=admin status=running pid=$PID'"
check status_counts_it sh -c 'systemctl show -p StatusText --value rexecd.service | grep -q "^1 running"'

# ---- stop, then start
check stop systemctl stop rexecd.service
check stopped service_is inactive
check stop_container_alive test -d "/proc/$PID"
check stop_socket_kept test -S "$SOCK"
check start systemctl start rexecd.service
check start_active service_is active
check start_still_running is_running vmc
check exec_works exec_hi

# ---- the journal's structured fields
check journal_container_id sh -c "journalctl CONTAINER_ID=$CID -o cat | grep -q 'container create: vmc'"
check journal_user sh -c "journalctl -u rexecd.service USER=admin -o cat | grep -q 'container start: vmc'"
check journal_request_id sh -c "journalctl -u rexecd.service -o verbose | grep -qE '^ +REQUEST_ID=[0-9a-f]{16}$'"
check journal_no_token sh -c "! journalctl -u rexecd.service -o cat | grep -qF '${TOKEN#rexec_}'"

# ---- a TCP listener too, from a drop-in on the socket unit (both fds passed)
mkdir -p /etc/systemd/system/rexecd.socket.d
printf '[Socket]\nListenStream=127.0.0.1:8080\n' > /etc/systemd/system/rexecd.socket.d/tcp.conf
systemctl daemon-reload
systemctl stop rexecd.service rexecd.socket
check tcp_socket_started systemctl start rexecd.socket
check tcp_activates curl -sSf -o /dev/null -m $((30 * SLOW)) http://127.0.0.1:8080/health
check tcp_unix_too curl -sSf -o /dev/null -m $((30 * SLOW)) --unix-socket "$SOCK" http://rexecd/health
check tcp_both_fds sh -c "journalctl -u rexecd.service -o cat | grep -q 'listening on .*unix:$SOCK (systemd fd rexecd).*tcp:127.0.0.1:8080 (systemd fd rexecd)'"
check tcp_loopback_no_warning sh -c "! journalctl -u rexecd.service -o cat | grep -q 'not a loopback address'"
rm -r /etc/systemd/system/rexecd.socket.d
systemctl daemon-reload

# ---- a stop of the container, and uninstall leaves nothing of ours running
api POST /api/containers/vmc/stop >/dev/null
check container_stopped until_true 60 is_stopped
check journal_stop_line sh -c "journalctl CONTAINER_ID=$CID -o cat | grep -q 'container stop: vmc'"
check uninstall /mnt/proj/scripts/uninstall
check uninstall_again /mnt/proj/scripts/uninstall
check units_gone sh -c '! systemctl cat rexecd.service >/dev/null 2>&1'

echo "---- journal of rexecd (tail)"
journalctl -u rexecd.service -u rexecd.socket -o short-monotonic --no-pager | tail -n 60
echo "timing: all done in $((SECONDS - start))s"
echo "fails: $fails"
[ "$fails" -eq 0 ]
