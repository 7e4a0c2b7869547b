#!/usr/bin/env bash
# Stop the single-node SLURM cluster that .ci/slurm-up.sh started: exactly the daemons whose pids
# it recorded in $SLURM_SCRATCH/daemons.pids (slurmd, then slurmctld, then munged), each only if
# the pid still belongs to that program. Daemons it did not start are left alone.
# Jobs still queued or running on this cluster are cancelled first, so no slurmstepd outlives it.
# Configuration, state and logs under $SLURM_SCRATCH are kept (they help when a CI run fails).
set -euo pipefail

MARKER="# Written by .ci/slurm-up.sh (cnnvis-pipeline)."
CONF=/etc/slurm/slurm.conf
if [[ -n ${SLURM_SCRATCH:-} ]]; then
    S=$SLURM_SCRATCH
elif [[ -f $CONF ]] && grep -qF "$MARKER" "$CONF"; then
    S=$(sed -n 's/^# scratch: //p' "$CONF" | head -n1)
fi
S=${S:-/tmp/cnnvis-slurm}
PIDS=$S/daemons.pids
export PATH=$PATH:/usr/sbin:/sbin

log() { echo "[slurm-down] $*"; }

pid_is() {
    [[ -n ${2:-} && -r /proc/$2/comm ]] && [[ $(cat "/proc/$2/comm" 2>/dev/null) == "$1" ]]
}

recorded_pid() {
    local name pid
    while read -r name pid; do
        [[ $name == "$1" ]] && pid_is "$1" "$pid" && { echo "$pid"; return 0; }
    done <"$PIDS"
    return 0
}

stop() {
    local name=$1 pid i
    pid=$(recorded_pid "$name")
    if [[ -z $pid ]]; then
        log "$name: no live process recorded, nothing to stop"
        return 0
    fi
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        pid_is "$name" "$pid" || { log "$name stopped"; return 0; }
        sleep 0.1
    done
    log "$name (pid $pid) ignored SIGTERM for 15 s: sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

if [[ ! -f $PIDS ]]; then
    log "no pid file $PIDS: nothing was started by .ci/slurm-up.sh, nothing to stop"
    exit 0
fi

# cancel what is left in the queue while slurmctld still runs (a stray job keeps slurmstepd alive)
if [[ -n $(recorded_pid slurmctld) ]] && command -v squeue >/dev/null 2>&1; then
    jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        log "cancelling jobs still on the cluster: ${jobs//$'\n'/ }"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs || true
        for ((i = 0; i < 100; i++)); do
            [[ -z $(timeout 10 squeue -h -t R,CG -o %i 2>/dev/null || true) ]] && break
            sleep 0.1
        done
    fi
fi

stop slurmd
stop slurmctld
stop munged
rm -f "$PIDS"
log "done (logs kept in $S/log)"
