#!/usr/bin/env bash
# Start a single-node SLURM on this host, to test the Snakemake profile (slurm/config.yaml)
# against real sbatch/squeue/scancel. Debian 12's SLURM 22.05, no systemd needed (the daemons
# are started directly). Install with install_slurm.sh, stop with stop_slurm.sh. Re-running is
# safe: daemons up with an unchanged config are left alone; a changed config restarts slurmctld
# and slurmd. slurm.conf is slurm.conf.template with each @NAME@ replaced by $NAME below.
# Environment knobs (all optional):
#   SLURM_CONF           config path (default /etc/slurm/slurm.conf, where Debian's client
#                        tools look; if you change it, export it for sinfo/sbatch/... too)
#   SLURM_START_TIMEOUT  seconds to wait for the node to be idle (default 90)
#   SLURM_MIN_JOB_AGE    MinJobAge in s (default 600, see the note in the template)
#   SLURM_FAKE_GPUS      0-4 (default 0): that many fake GPUs (gres gpu, type "fake", backed
#                        by /dev/null-like files) so rules with `gpu: N` get scheduled, with
#                        CUDA_VISIBLE_DEVICES set. No GPU behind them: resource plumbing only.
set -euo pipefail
fail() { echo "start_slurm.sh: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || fail "must run as root (starts munged/slurmctld/slurmd)"
for bin in slurmctld slurmd sinfo scontrol munged munge unmunge; do
    command -v "$bin" >/dev/null 2>&1 || fail "'$bin' not found; run tests/slurm/install_slurm.sh"
done

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export SLURM_CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
TIMEOUT=${SLURM_START_TIMEOUT:-90} MIN_JOB_AGE=${SLURM_MIN_JOB_AGE:-600}
FAKE_GPUS=${SLURM_FAKE_GPUS:-0} FAKE_GPU_FILES=(/dev/null /dev/zero /dev/full /dev/urandom)
NODE=$(hostname -s) CLUSTER=gtmoe-test STATE_DIR=/var/spool/slurmctld SPOOL_DIR=/var/spool/slurmd
CTLD_PID=/run/slurmctld.pid SLURMD_PID=/run/slurmd.pid GRES_CONF=$(dirname "$SLURM_CONF")/gres.conf
LOG_DIR=/var/log/slurm CTLD_LOG=/var/log/slurm/slurmctld.log SLURMD_LOG=/var/log/slurm/slurmd.log
MUNGE_KEY=/etc/munge/munge.key MUNGE_PID=/run/munge/munged.pid MUNGE_LOG=/var/log/munge/munged.log
MARKER="# Written by tests/slurm/start_slurm.sh" STAMP=$(date +%Y%m%d%H%M%S) CHANGED=0

log() { echo "[start_slurm] $*"; }
die() {
    echo "start_slurm.sh: ERROR: $*" >&2
    for cmd in "sinfo -N -l" "sinfo -R" "scontrol show node $NODE" "tail -n 30 $CTLD_LOG" \
        "tail -n 30 $SLURMD_LOG" "tail -n 30 $MUNGE_LOG"; do
        echo "---- $cmd ----" && $cmd 2>&1 || true
    done >&2
    exit 1
}
pid_alive() {   # pid_alive PIDFILE NAME: the pid file names a live process called NAME*
    local pid
    pid=$(cat "$1" 2>/dev/null) && [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null &&
        [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2"* ]]
}
start_daemon() {   # start_daemon NAME PIDFILE CMD...: run CMD (it daemonizes) unless NAME is up
    local name=$1 pidfile=$2; shift 2
    if pid_alive "$pidfile" "$name"; then log "$name already running (pid $(<"$pidfile"))"; return; fi
    log "starting $name"; rm -f "$pidfile"
    "$@" || die "$name failed to start"
}
retry() {   # retry N DELAY CMD...: run CMD up to N times, DELAY s apart, until it succeeds
    local n=$1 delay=$2; shift 2
    until "$@"; do (( --n > 0 )) || return 1; sleep "$delay"; done
}
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
ctld_up() { [[ $(scontrol ping 2>/dev/null) == *'is UP'* ]]; }
put_conf() {   # NEW DEST WHAT: install NEW as DEST if it differs (CHANGED=1); back up a DEST not ours
    if cmp -s "$1" "$2"; then log "config $2 unchanged"; return; fi
    if [[ -f $2 ]] && ! grep -qF "$MARKER" "$2"; then
        log "existing $2 was not written by this script; saved as $2.bak.$STAMP"
        cp -p "$2" "$2.bak.$STAMP"
    fi
    install -m 0644 "$1" "$2"
    CHANGED=1; log "wrote $2 ($3)"
}

[[ $FAKE_GPUS =~ ^[0-4]$ ]] || die "SLURM_FAKE_GPUS must be 0-4, got '$FAKE_GPUS'"
[[ $MIN_JOB_AGE =~ ^[0-9]+$ ]] || die "SLURM_MIN_JOB_AGE must be whole seconds, got '$MIN_JOB_AGE'"

install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s $MUNGE_KEY ]]; then
    log "creating munge key $MUNGE_KEY"
    mungekey --create --keyfile="$MUNGE_KEY" --force 2>/dev/null ||
        dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
fi
chown munge:munge "$MUNGE_KEY"
chmod 0400 "$MUNGE_KEY"
pid_alive "$MUNGE_PID" munged || rm -f /run/munge/munge.socket.2*   # a dead munged's socket
start_daemon munged "$MUNGE_PID" runuser -u munge -- munged
retry 20 0.5 munge_ok || die "munge round trip (munge -n | unmunge) failed"

# `slurmd -C` prints this machine's layout (CPUs, sockets, cores, threads, RealMemory): copying
# it keeps the node from being set INVALID/DRAIN for a mismatch with the hardware.
HW=$(slurmd -C | sed -n 1p)
[[ $HW == NodeName=* ]] || die "unexpected 'slurmd -C' output: $HW"
HW=${HW#NodeName=* }   # drop "NodeName=<name> "; keep CPUs=... RealMemory=...
GRES_TYPES='' GRES_NODE=''
(( FAKE_GPUS == 0 )) || GRES_TYPES=GresTypes=gpu GRES_NODE="Gres=gpu:fake:$FAKE_GPUS "
NEW_CONF=$(mktemp) NEW_GRES=$(mktemp)
trap 'rm -f "$NEW_CONF" "$NEW_GRES"' EXIT
subst=()   # sed -e 's|@NAME@|<value>|g' for each; no value holds '|', '&' or '\'
for v in NODE CLUSTER STATE_DIR SPOOL_DIR CTLD_PID SLURMD_PID CTLD_LOG SLURMD_LOG MIN_JOB_AGE \
    GRES_TYPES GRES_NODE HW; do subst+=(-e "s|@$v@|${!v}|g"); done
sed "${subst[@]}" "$HERE/slurm.conf.template" > "$NEW_CONF"
{
    echo "$MARKER: $FAKE_GPUS fake GPU(s), no real device behind them."
    for f in "${FAKE_GPU_FILES[@]:0:FAKE_GPUS}"; do echo "NodeName=$NODE Name=gpu Type=fake File=$f"; done
} > "$NEW_GRES"
mkdir -p "$(dirname "$SLURM_CONF")" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR"
put_conf "$NEW_CONF" "$SLURM_CONF" "$HW"
if (( FAKE_GPUS > 0 )); then
    put_conf "$NEW_GRES" "$GRES_CONF" "$FAKE_GPUS fake GPUs"
elif [[ -f $GRES_CONF ]] && grep -qF "$MARKER" "$GRES_CONF"; then   # only a gres.conf of ours
    rm -f "$GRES_CONF"
    CHANGED=1; log "removed $GRES_CONF (no fake GPUs)"
fi

if (( CHANGED )) && { pid_alive "$CTLD_PID" slurmctld || pid_alive "$SLURMD_PID" slurmd; }; then
    log "config changed: restarting slurmctld/slurmd"
    KEEP_MUNGE=1 "$HERE/stop_slurm.sh"
fi
start_daemon slurmctld "$CTLD_PID" slurmctld
# slurmd registers with slurmctld at start-up: wait for the controller first.
retry 40 0.5 ctld_up || die "slurmctld does not answer 'scontrol ping'"
start_daemon slurmd "$SLURMD_PID" slurmd
# slurmd may exit right after forking (bad config, port in use): the loop below checks.
retry 20 0.25 pid_alive "$SLURMD_PID" slurmd || true

log "waiting up to ${TIMEOUT}s for node '$NODE' to be idle"
deadline=$((SECONDS + TIMEOUT)) resumed=0
while :; do
    # sinfo alone is not enough: slurmctld keeps reporting a node idle for SlurmdTimeout
    # (300 s) after its slurmd died, so check the pid too.
    pid_alive "$SLURMD_PID" slurmd || die "slurmd is not running"
    state=$(sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | sed -n 1p || true)
    [[ $state =~ ^(idle|mixed|allocated|completing)$ ]] && break
    # drain/down/inval left over from an earlier run (admin drain, a config mismatch fixed since),
    # with slurmd registered so ReturnToService cannot help: resume once. ("down*": not yet registered.)
    if [[ $resumed == 0 && $state =~ drain|^down$|^inval$ ]]; then
        log "node is '$state'; resuming it"
        scontrol update NodeName="$NODE" State=RESUME || true
        resumed=1
    fi
    (( SECONDS < deadline )) || die "node '$NODE' not idle after ${TIMEOUT}s (state: '${state:-unknown}')"
    sleep 1
done

log "SLURM is up: node '$NODE' is $state"
sinfo
printf '\nTry:   sbatch --wrap hostname ; srun hostname ; squeue\nLogs:  %s  %s  %s\nStop:  %s\n' \
    "$CTLD_LOG" "$SLURMD_LOG" "$MUNGE_LOG" "$HERE/stop_slurm.sh"
