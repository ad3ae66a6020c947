#!/usr/bin/env bash
# Start a single-node SLURM cluster on this host, for testing the Snakemake
# SLURM profile (slurm/config.yaml) against real sbatch/squeue/scancel.
#
#   sudo tests/slurm/install_slurm.sh   # once: apt-get install slurm + munge
#   sudo tests/slurm/start_slurm.sh     # idempotent: (re)writes config, starts
#   sudo tests/slurm/stop_slurm.sh      # stops slurmd, slurmctld, munged
#
# Targets Debian 12's SLURM 22.05 (only options that version knows) and
# machines without systemd (containers, CI): the daemons are started directly.
# Running it again is safe: daemons that are up with an unchanged config are
# left alone; a changed config (e.g. different CPU/memory) restarts slurmctld
# and slurmd.
#
# Environment knobs (all optional):
#   SLURM_CONF             config path (default /etc/slurm/slurm.conf, the
#                          path Debian's client tools read; if you change it,
#                          export the same SLURM_CONF for sinfo/sbatch/...)
#   SLURM_START_TIMEOUT    seconds to wait for the node to be idle (default 90)
#   SLURM_MIN_JOB_AGE      MinJobAge in s (default 600, see note in the config)
#   SLURM_FAKE_GPUS        0-4 (default 0): give the node that many fake GPUs
#                          (gres gpu, type "fake", backed by /dev/null-like
#                          files) so rules with `gpu: N` get scheduled, with
#                          CUDA_VISIBLE_DEVICES set. There is no GPU behind
#                          them: it tests the resource plumbing only.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "start_slurm.sh: must run as root (starts munged/slurmctld/slurmd)" >&2
    exit 1
fi

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export SLURM_CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
TIMEOUT=${SLURM_START_TIMEOUT:-90}
MIN_JOB_AGE=${SLURM_MIN_JOB_AGE:-600}

NODE=$(hostname -s)
CLUSTER=gtmoe-test
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm
CTLD_LOG=$LOG_DIR/slurmctld.log
SLURMD_LOG=$LOG_DIR/slurmd.log
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_KEY=/etc/munge/munge.key
MUNGE_RUN=/run/munge
MUNGE_PID=$MUNGE_RUN/munged.pid
MUNGE_LOG=/var/log/munge/munged.log
GRES_CONF=$(dirname "$SLURM_CONF")/gres.conf
FAKE_GPUS=${SLURM_FAKE_GPUS:-0}
FAKE_GPU_FILES=(/dev/null /dev/zero /dev/full /dev/urandom)
MARKER="# Written by tests/slurm/start_slurm.sh"

log() { echo "[start_slurm] $*"; }

for bin in slurmctld slurmd sinfo scontrol munged munge unmunge; do
    if ! command -v "$bin" >/dev/null 2>&1; then
        echo "start_slurm.sh: '$bin' not found; run tests/slurm/install_slurm.sh" >&2
        exit 1
    fi
done

# pid_alive PIDFILE NAME -> 0 if the pid file names a live process called NAME
pid_alive() {
    local pidfile=$1 name=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name"* ]]
}

dump_diagnostics() {
    echo "---- sinfo -N -l ----"
    sinfo -N -l 2>&1 || true
    echo "---- sinfo -R (down/drain reasons) ----"
    sinfo -R 2>&1 || true
    echo "---- scontrol show node $NODE ----"
    scontrol show node "$NODE" 2>&1 || true
    local f
    for f in "$CTLD_LOG" "$SLURMD_LOG" "$MUNGE_LOG"; do
        echo "---- tail -n 30 $f ----"
        tail -n 30 "$f" 2>&1 || true
    done
}

die() {
    echo "start_slurm.sh: ERROR: $*" >&2
    dump_diagnostics >&2
    exit 1
}

# ---------------------------------------------------------------- munge ----
install -d -o munge -g munge -m 0700 /etc/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0700 /var/log/munge
install -d -o munge -g munge -m 0755 "$MUNGE_RUN"
if [[ ! -s $MUNGE_KEY ]]; then
    log "creating munge key $MUNGE_KEY"
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile="$MUNGE_KEY" --force
    else
        dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    fi
fi
chown munge:munge "$MUNGE_KEY"
chmod 0400 "$MUNGE_KEY"

if pid_alive "$MUNGE_PID" munged; then
    log "munged already running (pid $(<"$MUNGE_PID"))"
else
    log "starting munged"
    rm -f "$MUNGE_PID" "$MUNGE_RUN"/munge.socket.2*
    runuser -u munge -- munged
fi
for _ in $(seq 1 20); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.5
done
munge -n | unmunge >/dev/null || die "munge round trip (munge -n | unmunge) failed"

# ---------------------------------------------------------------- config ---
# slurmd -C prints this machine's real layout (CPUs, sockets, cores, threads,
# RealMemory). Copying it avoids the node being set INVALID/DRAIN for a
# mismatch between slurm.conf and the hardware.
HW=$(slurmd -C | sed -n 1p)
[[ $HW == NodeName=* ]] || die "unexpected 'slurmd -C' output: $HW"
HW=${HW#NodeName=* }   # drop "NodeName=<name> "; keep CPUs=... RealMemory=...

[[ $FAKE_GPUS =~ ^[0-4]$ ]] || die "SLURM_FAKE_GPUS must be 0-4, got '$FAKE_GPUS'"
GRES_NODE='' GRES_TYPES=
if (( FAKE_GPUS > 0 )); then
    GRES_NODE="Gres=gpu:fake:$FAKE_GPUS "
    GRES_TYPES="GresTypes=gpu"
fi

NEW_CONF=$(mktemp)
NEW_GRES=$(mktemp)
trap 'rm -f "$NEW_CONF" "$NEW_GRES"' EXIT
cat > "$NEW_CONF" <<EOF
$MARKER for host '$NODE'.
# Single-node test cluster, no accounting (no slurmdbd, so no sacct/sacctmgr).
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Jobs that give no --mem get this much per CPU instead of the whole node.
DefMemPerCPU=1000
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# SlurmctldPort/SlurmdPort: defaults (6817/6818).
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
SlurmctldDebug=info
SlurmdDebug=info
# A node that went DOWN (e.g. slurmd restarted) comes back when it registers.
ReturnToService=2
# Finished jobs stay visible to squeue for MinJobAge seconds. Snakemake's
# slurm executor polls with 'squeue' here (no sacct) and waits forever for a
# job that vanished from squeue, so keep this well above its 180 s maximum
# poll interval (the plugin also needs >= 3 x init-seconds-before-status-checks).
MinJobAge=$MIN_JOB_AGE
MailProg=/bin/true
$GRES_TYPES

NodeName=$NODE NodeAddr=127.0.0.1 $GRES_NODE$HW State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
{
    echo "$MARKER: $FAKE_GPUS fake GPU(s), no real device behind them."
    for ((i = 0; i < FAKE_GPUS; i++)); do
        echo "NodeName=$NODE Name=gpu Type=fake File=${FAKE_GPU_FILES[$i]}"
    done
} > "$NEW_GRES"

mkdir -p "$(dirname "$SLURM_CONF")" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR"
CONF_CHANGED=0
if [[ -f $SLURM_CONF ]] && cmp -s "$NEW_CONF" "$SLURM_CONF"; then
    log "config $SLURM_CONF unchanged"
else
    if [[ -f $SLURM_CONF ]] && ! grep -qF "$MARKER" "$SLURM_CONF"; then
        backup=$SLURM_CONF.bak.$(date +%Y%m%d%H%M%S)
        log "existing $SLURM_CONF was not written by this script; saved as $backup"
        cp -p "$SLURM_CONF" "$backup"
    fi
    install -m 0644 "$NEW_CONF" "$SLURM_CONF"
    CONF_CHANGED=1
    log "wrote $SLURM_CONF ($HW)"
fi
# gres.conf: only with fake GPUs; never delete one this script did not write.
if (( FAKE_GPUS > 0 )); then
    if [[ -f $GRES_CONF ]] && ! grep -qF "$MARKER" "$GRES_CONF"; then
        backup=$GRES_CONF.bak.$(date +%Y%m%d%H%M%S)
        log "existing $GRES_CONF was not written by this script; saved as $backup"
        cp -p "$GRES_CONF" "$backup"
    fi
    if ! cmp -s "$NEW_GRES" "$GRES_CONF" 2>/dev/null; then
        install -m 0644 "$NEW_GRES" "$GRES_CONF"
        CONF_CHANGED=1
        log "wrote $GRES_CONF ($FAKE_GPUS fake GPUs)"
    fi
elif [[ -f $GRES_CONF ]] && grep -qF "$MARKER" "$GRES_CONF"; then
    rm -f "$GRES_CONF"
    CONF_CHANGED=1
    log "removed $GRES_CONF (no fake GPUs)"
fi

# --------------------------------------------------------------- daemons ---
if [[ $CONF_CHANGED == 1 ]] && { pid_alive "$CTLD_PID" slurmctld || pid_alive "$SLURMD_PID" slurmd; }; then
    log "config changed: restarting slurmctld/slurmd"
    KEEP_MUNGE=1 "$HERE/stop_slurm.sh"
fi

if pid_alive "$CTLD_PID" slurmctld; then
    log "slurmctld already running (pid $(<"$CTLD_PID"))"
else
    log "starting slurmctld"
    slurmctld || die "slurmctld failed to start"
fi
# slurmd registers with slurmctld at start-up: wait for the controller first.
for _ in $(seq 1 40); do
    [[ $(scontrol ping 2>/dev/null) == *'is UP'* ]] && break
    sleep 0.5
done
[[ $(scontrol ping 2>&1) == *'is UP'* ]] || die "slurmctld does not answer 'scontrol ping'"

if pid_alive "$SLURMD_PID" slurmd; then
    log "slurmd already running (pid $(<"$SLURMD_PID"))"
else
    log "starting slurmd"
    slurmd || die "slurmd failed to start"
fi
# slurmd may exit right after forking (bad config, port in use): check it.
for _ in $(seq 1 20); do
    pid_alive "$SLURMD_PID" slurmd && break
    sleep 0.25
done

# ----------------------------------------------------- wait for the node ---
log "waiting up to ${TIMEOUT}s for node '$NODE' to be idle"
deadline=$((SECONDS + TIMEOUT))
resumed=0
while :; do
    # sinfo alone is not enough: slurmctld keeps reporting a node idle for
    # SlurmdTimeout (300 s) after its slurmd died, so check the pid too.
    pid_alive "$SLURMD_PID" slurmd || die "slurmd is not running"
    state=$(sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | sed -n 1p || true)
    case $state in
        idle|mixed|allocated|completing) break ;;
        *drain*|down|inval)
            # Left over from an earlier run (admin drain, a config mismatch
            # fixed since, ...) with slurmd already registered, so
            # ReturnToService cannot help: resume once. ("down*" = slurmd not
            # answering yet; that one is left to registration.)
            if [[ $resumed == 0 ]]; then
                log "node is '$state'; resuming it"
                scontrol update NodeName="$NODE" State=RESUME || true
                resumed=1
            fi ;;
    esac
    if (( SECONDS >= deadline )); then
        die "node '$NODE' not idle after ${TIMEOUT}s (state: '${state:-unknown}')"
    fi
    sleep 1
done

log "SLURM is up: node '$NODE' is $state"
sinfo
cat <<EOF

Try:   sbatch --wrap hostname ; srun hostname ; squeue
Logs:  $CTLD_LOG  $SLURMD_LOG  $MUNGE_LOG
Stop:  $HERE/stop_slurm.sh
EOF
