#!/usr/bin/env bash
# Bring up a single-node SLURM cluster (munged + slurmctld + slurmd) on this machine, for CI and
# for trying the workflow's SLURM profile (workflow/profiles/slurm). See docs/HPC.md.
#
#   sudo .ci/slurm-up.sh            # idempotent: safe to run again while the cluster is up
#   sudo .ci/slurm-down.sh          # stops exactly the daemons this script started (by pid)
#
# What it does:
#   1. installs slurm-wlm slurmctld slurmd slurm-client munge with apt-get if a binary is missing;
#   2. writes /etc/slurm/slurm.conf and /etc/slurm/gres.conf: one node "localhost" with
#      CPUs = nproc, RealMemory below the real memory, one fake GPU (gres gpu:fake:1 on /dev/null),
#      partitions `debug` (default) and `gpu`; no accounting database (so Snakemake must use
#      `--slurm-status-command squeue`, which the profile does);
#   3. creates a munge key if there is none;
#   4. starts whichever of munged, slurmctld, slurmd is not already running, records the pids it
#      started in $SLURM_SCRATCH/daemons.pids, and waits (bounded) until the node is idle.
# It exits non-zero, after printing the tails of the daemons' logs, if the cluster does not come up.
#
# Environment:
#   SLURM_SCRATCH       state, spool, logs and pid files (default /tmp/cnnvis-slurm; absolute path)
#   SLURM_UP_TIMEOUT    seconds to wait for each daemon / for the node to be idle (default 60)
#   SLURM_NODE_CPUS     CPUs of the node (default: nproc)
#   SLURM_NODE_GPUS     number of fake GPUs (default 1)
set -euo pipefail

S=${SLURM_SCRATCH:-/tmp/cnnvis-slurm}
WAIT=${SLURM_UP_TIMEOUT:-60}
PIDS=$S/daemons.pids
CONF=/etc/slurm/slurm.conf
GRES=/etc/slurm/gres.conf
MARKER="# Written by .ci/slurm-up.sh (cnnvis-pipeline)."
MUNGE_PIDFILE=/run/munge/munged.pid

log() { echo "[slurm-up] $*"; }

show_logs() {
    local f
    for f in "$S/log/slurmctld.log" "$S/log/slurmd.log" "$S/log/munged.out" \
        "$S/log/slurmctld.out" "$S/log/slurmd.out" /var/log/munge/munged.log; do
        if [[ -s $f ]]; then
            echo "----- tail of $f -----" >&2
            tail -n 25 "$f" >&2 || true
        fi
    done
    if command -v sinfo >/dev/null 2>&1; then
        echo "----- sinfo -R / scontrol show node -----" >&2
        timeout 10 sinfo -R >&2 2>&1 || true
        timeout 10 scontrol show node localhost >&2 2>&1 || true
    fi
}

die() {
    echo "[slurm-up] ERROR: $*" >&2
    show_logs
    exit 1
}

# pid_is NAME PID: true when PID is alive and is the program NAME (guards against pid reuse).
pid_is() {
    [[ -n ${2:-} && -r /proc/$2/comm ]] && [[ $(cat "/proc/$2/comm" 2>/dev/null) == "$1" ]]
}

# recorded_pid NAME: the pid this script recorded for NAME, if that process is still NAME.
recorded_pid() {
    local name pid
    [[ -f $PIDS ]] || return 0
    while read -r name pid; do
        if [[ $name == "$1" ]] && pid_is "$1" "$pid"; then
            echo "$pid"
            return 0
        fi
    done <"$PIDS"
}

# record NAME PID: (re)write the pid file keeping the other, still-alive entries.
record() {
    local tmp name pid
    tmp=$(mktemp "$S/daemons.pids.XXXXXX")
    if [[ -f $PIDS ]]; then
        while read -r name pid; do
            [[ $name != "$1" ]] && pid_is "$name" "$pid" && echo "$name $pid" >>"$tmp"
        done <"$PIDS"
    fi
    echo "$1 $2" >>"$tmp"
    mv "$tmp" "$PIDS"
}

# stop_recorded NAME: stop the daemon NAME that this script started (used on a config change).
stop_recorded() {
    local pid i
    pid=$(recorded_pid "$1")
    [[ -n $pid ]] || return 0
    log "stopping $1 (pid $pid) to apply the new configuration"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        pid_is "$1" "$pid" || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

# wait_pidfile NAME FILE: wait until FILE holds the pid of a live NAME; print it.
wait_pidfile() {
    local pid deadline=$((SECONDS + WAIT))
    while ((SECONDS < deadline)); do
        pid=$(cat "$2" 2>/dev/null || true)
        if pid_is "$1" "$pid"; then
            echo "$pid"
            return 0
        fi
        sleep 0.2
    done
    return 1
}

# ---------------------------------------------------------------------------------------------
[[ $(id -u) -eq 0 ]] || { echo "[slurm-up] ERROR: must run as root (it writes /etc/slurm, starts daemons)" >&2; exit 1; }
[[ $S == /* && $S != *[[:space:]]* ]] || { echo "[slurm-up] ERROR: SLURM_SCRATCH must be an absolute path without spaces: '$S'" >&2; exit 1; }

# 1. packages ----------------------------------------------------------------------------------
missing=()
for b in munged slurmctld slurmd sinfo sbatch squeue scontrol; do
    command -v "$b" >/dev/null 2>&1 || [[ -x /usr/sbin/$b ]] || missing+=("$b")
done
if ((${#missing[@]})); then
    log "installing SLURM and munge (missing: ${missing[*]})"
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install slurm-wlm and munge by hand"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends \
        slurm-wlm slurmctld slurmd slurm-client munge || die "apt-get install failed"
else
    log "SLURM and munge already installed"
fi
export PATH=$PATH:/usr/sbin:/sbin

# 2. configuration -----------------------------------------------------------------------------
mkdir -p /etc/slurm "$S/run" "$S/log" "$S/spool/slurmd" "$S/spool/slurmctld"

cpus=${SLURM_NODE_CPUS:-$(nproc)}
gpus=${SLURM_NODE_GPUS:-1}
[[ $cpus =~ ^[1-9][0-9]*$ && $gpus =~ ^[1-9][0-9]*$ ]] || die "SLURM_NODE_CPUS/SLURM_NODE_GPUS must be positive integers"
overrides=""
if ((cpus > $(nproc))); then
    # more CPUs than the machine has: slurmd would mark the node invalid without this
    overrides="SlurmdParameters=config_overrides"
fi
mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
# a cgroup (v2 or v1) memory limit below the physical memory also counts
for f in /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory/memory.limit_in_bytes; do
    if [[ -r $f ]]; then
        lim=$(cat "$f")
        if [[ $lim =~ ^[0-9]+$ ]] && ((lim / 1048576 < mem_mb)); then mem_mb=$((lim / 1048576)); fi
    fi
done
# slurmd marks the node invalid if RealMemory exceeds what it measures: stay 10 % below
real_mem=$((mem_mb * 9 / 10))
((real_mem >= 1000)) || die "too little memory for a SLURM node: ${mem_mb} MB"

tmpconf=$(mktemp)
tmpgres=$(mktemp)
trap 'rm -f "$tmpconf" "$tmpgres"' EXIT
cat >"$tmpconf" <<EOF
$MARKER
# scratch: $S
# A single-node cluster for CI; see docs/HPC.md. No accounting storage: use squeue for status.
ClusterName=cnnvis
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
${overrides}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without a default, a job takes the whole node's memory and jobs run one at a time
DefMemPerCPU=500
# finished jobs stay visible to squeue/scontrol this long: must stay well above Snakemake's
# status-check interval (up to 180 s), or the plugin's squeue status check loses jobs; an hour
# also lets tests inspect every job of a whole CI run with scontrol show job
MinJobAge=3600
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$S/log/jobcomp.txt
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd.pid
SlurmdSpoolDir=$S/spool/slurmd
StateSaveLocation=$S/spool/slurmctld
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mem Gres=gpu:fake:$gpus State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost Default=NO MaxTime=INFINITE State=UP
EOF
{
    echo "$MARKER"
    echo "# Fake GPUs: they check how jobs are submitted and scheduled, not GPU use."
    echo "AutoDetect=off"
    if ((gpus == 1)); then
        echo "NodeName=localhost Name=gpu Type=fake File=/dev/null"
    else
        # several fake devices: links to /dev/null (slurmd wants character devices)
        mkdir -p "$S/dev"
        for ((i = 0; i < gpus; i++)); do ln -sfn /dev/null "$S/dev/nvidia$i"; done
        echo "NodeName=localhost Name=gpu Type=fake File=$S/dev/nvidia[0-$((gpus - 1))]"
    fi
} >"$tmpgres"

changed=0
for pair in "$tmpconf:$CONF" "$tmpgres:$GRES"; do
    src=${pair%%:*}
    dst=${pair#*:}
    if [[ -f $dst ]] && cmp -s "$src" "$dst"; then
        continue
    fi
    if [[ -f $dst ]] && ! grep -qF "$MARKER" "$dst"; then
        log "keeping a copy of the existing $dst as $dst.orig"
        [[ -e $dst.orig ]] || cp -p "$dst" "$dst.orig"
    fi
    install -m 0644 "$src" "$dst"
    log "wrote $dst"
    changed=1
done
if ((changed == 0)); then
    log "configuration unchanged ($CONF, $GRES)"
fi

# 3. munge key ---------------------------------------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

# 4. daemons -----------------------------------------------------------------------------------
if ((changed)); then
    # daemons started earlier by this script run with the old configuration
    stop_recorded slurmd
    stop_recorded slurmctld
fi

# munged
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if timeout 10 munge -n </dev/null 2>/dev/null | timeout 10 unmunge >/dev/null 2>&1; then
    pid=$(recorded_pid munged)
    log "munged is running${pid:+ (pid $pid, started by this script)}"
else
    log "starting munged"
    rm -f "$MUNGE_PIDFILE"
    runuser -u munge -- /usr/sbin/munged --force </dev/null >"$S/log/munged.out" 2>&1 ||
        die "munged did not start"
    pid=$(wait_pidfile munged "$MUNGE_PIDFILE") || die "munged wrote no pid file"
    record munged "$pid"
    log "munged started (pid $pid)"
    timeout 10 munge -n </dev/null | timeout 10 unmunge >/dev/null || die "munge credentials do not work"
fi

# slurmctld
ctld_up() { timeout 10 scontrol ping 2>/dev/null | grep -q "is UP"; }
if ctld_up; then
    pid=$(recorded_pid slurmctld)
    log "slurmctld is running${pid:+ (pid $pid, started by this script)}"
    [[ -n $pid ]] || log "note: that slurmctld was not started by this script; slurm-down.sh will leave it"
else
    log "starting slurmctld"
    rm -f "$S/run/slurmctld.pid"
    /usr/sbin/slurmctld </dev/null >"$S/log/slurmctld.out" 2>&1 || die "slurmctld did not start"
    pid=$(wait_pidfile slurmctld "$S/run/slurmctld.pid") || die "slurmctld wrote no pid file"
    record slurmctld "$pid"
    deadline=$((SECONDS + WAIT))
    until ctld_up; do
        ((SECONDS < deadline)) || die "slurmctld (pid $pid) does not answer 'scontrol ping' after ${WAIT}s"
        pid_is slurmctld "$pid" || die "slurmctld (pid $pid) exited"
        sleep 0.2
    done
    log "slurmctld started (pid $pid)"
fi

# slurmd
pid=$(recorded_pid slurmd)
if [[ -z $pid ]] && pid_is slurmd "$(cat "$S/run/slurmd.pid" 2>/dev/null || true)"; then
    log "slurmd is running (not started by this script; slurm-down.sh will leave it)"
elif [[ -n $pid ]]; then
    log "slurmd is running (pid $pid, started by this script)"
else
    log "starting slurmd"
    rm -f "$S/run/slurmd.pid"
    /usr/sbin/slurmd -N localhost </dev/null >"$S/log/slurmd.out" 2>&1 || die "slurmd did not start"
    pid=$(wait_pidfile slurmd "$S/run/slurmd.pid") || die "slurmd wrote no pid file"
    record slurmd "$pid"
    log "slurmd started (pid $pid)"
fi

# node ready?
deadline=$((SECONDS + WAIT))
while :; do
    state=$(timeout 10 sinfo -h -N -n localhost -p debug -o %t 2>/dev/null | head -n1 || true)
    case $state in
        idle | mix | mixed | alloc | allocated) break ;;
        inval*)
            die "node 'localhost' is invalid: slurmd disagrees with $CONF (see Reason below)" ;;
        drain* | drng | fail*)
            timeout 10 scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true ;;
    esac
    ((SECONDS < deadline)) || die "node 'localhost' is '${state:-unknown}', not idle, after ${WAIT}s"
    sleep 0.2
done
log "cluster is up: node localhost is $state; partitions: $(sinfo -h -o %P | tr '\n' ' ')"
log "daemons started by this script (pids in $PIDS): $(tr '\n' ' ' <"$PIDS" 2>/dev/null || echo none)"
