#!/usr/bin/env bash
# Install a single-node SLURM (controller + compute daemon + client tools) and
# munge from Debian's packages.  Non-interactive; safe to re-run.
# Debian 12 (bookworm) ships SLURM 22.05.8 and munge 0.5.15.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "install_slurm.sh: must run as root (apt-get install)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# Another apt/dpkg may hold the lock (shared machines, unattended upgrades): wait.
APT_LOCK=(-o DPkg::Lock::Timeout=600)
apt-get "${APT_LOCK[@]}" update -qq
apt-get "${APT_LOCK[@]}" install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    slurmctld slurmd slurm-client munge
# (sinfo -V needs a slurm.conf; the daemons print their version without one.)
slurmctld -V
