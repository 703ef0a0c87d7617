#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, to run the pipeline through
# `snakemake --profile profiles/slurm` for real (tests/test_slurm.py, README).
#
#   scripts/slurm_local.sh start    # install (Debian 12: slurm-wlm 22.05, munge) if needed, start, check
#   scripts/slurm_local.sh status   # daemons, sinfo, squeue
#   scripts/slurm_local.sh stop     # cancel its jobs, stop the daemons this script started
#
# Runs as root (slurmd must), without systemd (containers, CI): the daemons are started
# directly. Everything it writes lives under $SLURM_LOCAL_DIR (default /tmp/vg-slurm):
# slurm.conf, controller state, slurmd spool, pid and log files. /etc/slurm/slurm.conf
# is made a link to that slurm.conf unless it exists already (a real cluster's): then
# `export SLURM_CONF=$SLURM_LOCAL_DIR/slurm.conf` before using sbatch, sinfo or snakemake.
#
# One node (NodeName = `hostname -s`, NodeAddr=127.0.0.1), one default partition `debug`.
# No cgroups (proctrack/linuxproc, task/none): nothing is confined or enforced; CPUs are
# scheduled (select/cons_tres, CR_Core), memory is only checked against the node's size.
#
# Job status without slurmdbd. snakemake-executor-plugin-slurm asks either
#   sacct -X --parsable2 --clusters all --noheader --format=JobIdRaw,State --starttime .. --name <run uuid>
# or
#   squeue --format=%i|%T --states=all --noheader --name <run uuid>
# sacct needs an accounting database (slurmdbd + MySQL/MariaDB): with
# AccountingStorageType=accounting_storage/none it only answers "accounting storage is
# disabled". squeue works from the controller alone, and sees finished jobs (COMPLETED,
# FAILED, ...) for MinJobAge seconds after they end; the plugin uses squeue when told to
# (profiles/slurm: slurm-status-command: squeue) and MinJobAge >= 3 x its first status check
# delay (40 s), otherwise it falls back to sacct. So: no slurmdbd, MinJobAge=3600, squeue.
# Accounts: without a database there are none. The plugin guesses one with sacct, fails,
# warns "Unable to guess SLURM account" and submits without -A, which is what we want here.
#
# Environment: SLURM_LOCAL_DIR (state folder); SLURM_LOCAL_CPUS, SLURM_LOCAL_MEM_MB (the
# node's declared size: default nproc, and MemTotal less 10 %, 512 MB to 2 GB; SLURM refuses
# jobs asking more, and takes a declared size above the hardware: SlurmdParameters=
# config_overrides); SLURM_LOCAL_CTLD_PORT, SLURM_LOCAL_SLURMD_PORT (6817, 6818);
# SLURM_LOCAL_TIMEOUT (seconds to wait for the node, 90); SLURM_LOCAL_GPUS (2: GPUs the node
# declares, counted only, so that GPU requests -- sbatch --gpus -- are scheduled as on a GPU
# cluster; the jobs see no GPU). Settings apply when slurmctld starts.
set -euo pipefail

D=${SLURM_LOCAL_DIR:-/tmp/vg-slurm}
CONF=$D/slurm.conf
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-90}
NODE=$(hostname -s 2>/dev/null || cut -d. -f1 /proc/sys/kernel/hostname)
PARTITION=debug
MARK="# written by scripts/slurm_local.sh"

log() { echo "slurm_local: $*" >&2; }

die() {
    log "ERROR: $*"
    for f in "$D/log/slurmctld.log" "$D/log/slurmd.log" "$D/log/munged.log"; do
        if [ -s "$f" ]; then
            echo "----- last lines of $f -----" >&2
            tail -n 40 "$f" >&2
        fi
    done
    exit 1
}

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

need_root() {
    [ "$(id -u)" = 0 ] || die "must run as root (slurmd runs jobs as their users; apt-get installs)"
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || die "slurmctld/slurmd/munged missing and no apt-get to install them"
    log "installing slurm-wlm and munge (apt-get)"
    local t0=$SECONDS policy=/usr/sbin/policy-rc.d added=""
    # keep the packages' init scripts from starting daemons with their default config
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    local ok=1
    apt-get update -qq >/dev/null || ok=""
    [ -n "$ok" ] && { apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null || ok=""; }
    [ -n "$added" ] && rm -f "$policy"
    [ -n "$ok" ] || die "apt-get install slurm-wlm munge failed"
    log "installed in $((SECONDS - t0)) s: $(slurmctld -V)"
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return  # a munged is running already (ours, or the system's)
    fi
    local key=/etc/munge/munge.key
    if [ ! -s "$key" ]; then
        log "creating $key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$key" --force
        else
            dd if=/dev/urandom bs=1 count=1024 of="$key" status=none
        fi
    fi
    # munged refuses keys and folders others can write or read
    local user=root
    id munge >/dev/null 2>&1 && user=munge
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown "$user:" /etc/munge "$key" /run/munge /var/lib/munge /var/log/munge
    chmod 0700 /etc/munge /var/lib/munge /var/log/munge
    chmod 0400 "$key"
    chmod 0755 /run/munge
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    touch "$D/log/munged.log" && chown "$user:" "$D/log/munged.log"
    runuser -u "$user" -- munged --log-file="$D/log/munged.log" --pid-file=/run/munge/munged.pid \
        || die "munged did not start"
    cp /run/munge/munged.pid "$D/run/munged.pid"  # marks it as ours: `stop` stops it
    local i
    for i in $(seq 20); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.5
    done
    die "munge does not work (munge -n | unmunge)"
}

write_conf() {
    local cpus mem total margin gpus gres
    cpus=${SLURM_LOCAL_CPUS:-$(nproc)}
    total=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    margin=$((total / 10))
    [ "$margin" -lt 512 ] && margin=512
    [ "$margin" -gt 2048 ] && margin=2048
    mem=${SLURM_LOCAL_MEM_MB:-$((total - margin))}
    gpus=${SLURM_LOCAL_GPUS:-2}
    # stand-in GPUs: generic resources `gpu` backed by harmless character devices (slurmd counts
    # a gpu only with a File), so sbatch --gpus=N is accepted, scheduled and sets
    # CUDA_VISIBLE_DEVICES as on a GPU cluster; the jobs see no real GPU
    local dev devs=(/dev/null /dev/zero /dev/full /dev/urandom)
    [ "$gpus" -le ${#devs[@]} ] || die "SLURM_LOCAL_GPUS=$gpus: at most ${#devs[@]} stand-in GPUs"
    echo "$MARK" >"$D/gres.conf"
    gres=""
    [ "$gpus" -gt 0 ] && gres="Gres=gpu:$gpus"
    for dev in "${devs[@]:0:$gpus}"; do
        echo "NodeName=$NODE Name=gpu File=$dev" >>"$D/gres.conf"
    done
    cat >"$CONF.new" <<EOF
$MARK: a one-node test cluster, state in $D
ClusterName=vglocal
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=${SLURM_LOCAL_CTLD_PORT:-6817}
SlurmdPort=${SLURM_LOCAL_SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
# no cgroups: nothing to set up in a container, nothing enforced
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# no slurmdbd: job status comes from squeue (see MinJobAge)
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# finished jobs stay visible to squeue for an hour (the slurm executor polls squeue)
MinJobAge=3600
SchedulerType=sched/backfill
# a job the node can never run (more CPUs or memory than it has) is refused by sbatch at
# once, instead of pending forever (Reason=PartitionConfig)
EnforcePartLimits=ALL
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu  # stand-in GPUs, see gres.conf
# the node is what this file says (no draining for small differences to the hardware)
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldTimeout=60
SlurmdTimeout=120
InactiveLimit=0
KillWait=10
Waittime=0
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$cpus RealMemory=$mem $gres State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.new" "$CONF"
    # the clients' default config path, unless a real cluster's config lives there
    local etc=/etc/slurm/slurm.conf
    if [ -L "$etc" ] || [ ! -e "$etc" ]; then
        mkdir -p /etc/slurm
        ln -sfn "$CONF" "$etc"
    elif [ "$(readlink -f "$etc")" != "$(readlink -f "$CONF")" ]; then
        log "$etc exists (not ours): export SLURM_CONF=$CONF to use this cluster"
    fi
}

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n 1; }

start() {
    need_root
    install_packages
    mkdir -p "$D/state" "$D/spool" "$D/run" "$D/log"
    export SLURM_CONF=$CONF
    if alive "$D/run/slurmctld.pid" && alive "$D/run/slurmd.pid"; then
        log "already running ($CONF)"
    else
        [ -e "$CONF" ] && ! head -n 1 "$CONF" | grep -q "^$MARK" && die "$CONF was not written by this script"
        start_munge
        if ! alive "$D/run/slurmctld.pid"; then
            write_conf
            slurmctld || die "slurmctld did not start"
        fi
        if ! alive "$D/run/slurmd.pid"; then
            slurmd -N "$NODE" || die "slurmd did not start"
        fi
    fi
    local t0=$SECONDS state=""
    while [ $((SECONDS - t0)) -lt "$TIMEOUT" ]; do
        state=$(node_state || true)
        case "$state" in
            idle* | mixed* | allocated* | completing*) break ;;
            down* | drain*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 1
    done
    case "$state" in
        idle* | mixed* | allocated* | completing*) ;;
        *) die "node $NODE not up after ${TIMEOUT} s (state: '${state:-none}'): $(scontrol show node "$NODE" 2>&1 | grep -i reason || true)" ;;
    esac
    local out
    out=$(timeout "$TIMEOUT" srun -N1 -n1 -p "$PARTITION" -t 1 hostname 2>&1) \
        || die "srun -N1 hostname failed: $out"
    log "up: node $NODE ($state), partition $PARTITION, srun ran on '$out'"
    [ "$(readlink -f /etc/slurm/slurm.conf 2>/dev/null)" = "$(readlink -f "$CONF")" ] \
        || log "export SLURM_CONF=$CONF"
}

stop_pidfile() {
    local name=$1 pidfile=$2 pid i
    alive "$pidfile" || { rm -f "$pidfile"; return 0; }
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for i in $(seq 30); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    kill -0 "$pid" 2>/dev/null && { log "$name ($pid) still running, killing it"; kill -9 "$pid" 2>/dev/null || true; }
    rm -f "$pidfile"
    log "stopped $name ($pid)"
}

stop() {
    need_root
    export SLURM_CONF=$CONF
    # jobs still running: cancel them (they are this test cluster's)
    if alive "$D/run/slurmctld.pid"; then
        squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
    fi
    stop_pidfile slurmd "$D/run/slurmd.pid"
    stop_pidfile slurmctld "$D/run/slurmctld.pid"
    # munged only if this script started it
    stop_pidfile munged "$D/run/munged.pid"
}

status() {
    export SLURM_CONF=$CONF
    local d
    for d in slurmctld slurmd munged; do
        if alive "$D/run/$d.pid"; then echo "$d: running (pid $(cat "$D/run/$d.pid"))"; else echo "$d: not started by this script"; fi
    done
    echo "config: $CONF"
    sinfo -N -l || true
    squeue || true
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
