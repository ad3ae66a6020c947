#!/usr/bin/env bash
# Stop the single-node SLURM started by tests/slurm/start_slurm.sh:
# slurmd, then slurmctld, then munged (unless KEEP_MUNGE=1). Only the
# processes named in the daemons' pid files are signalled. Idempotent: a
# daemon that is not running is skipped. Jobs still running are killed with
# slurmd; slurmctld saves its state, so queued jobs survive a restart
# (delete /var/spool/slurmctld for a clean slate).
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "stop_slurm.sh: must run as root" >&2
    exit 1
fi

log() { echo "[stop_slurm] $*"; }

# stop_daemon NAME PIDFILE: SIGTERM, wait up to 20 s, then SIGKILL.
stop_daemon() {
    local name=$1 pidfile=$2 pid
    if [[ ! -s $pidfile ]]; then
        log "$name: no pid file ($pidfile), not running"
        return 0
    fi
    pid=$(<"$pidfile")
    if ! [[ $pid =~ ^[0-9]+$ ]] || ! kill -0 "$pid" 2>/dev/null \
        || [[ $(cat "/proc/$pid/comm" 2>/dev/null) != "$name"* ]]; then
        log "$name: not running (stale pid file)"
        rm -f "$pidfile"
        return 0
    fi
    log "stopping $name (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq 1 40); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name did not exit after 20 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

stop_daemon slurmd /run/slurmd.pid
stop_daemon slurmctld /run/slurmctld.pid
if [[ ${KEEP_MUNGE:-0} != 1 ]]; then
    stop_daemon munged /run/munge/munged.pid
fi
log "done"
