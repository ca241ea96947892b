#!/usr/bin/env bash
# A real local Slurm for the launcher tests and CI: one controller and N emulated nodes on this
# machine (Debian packages; root needed), plus a pyxis stub so --container-* options are accepted.
#
#   scripts/slurm_local.sh up              install if needed, configure, start munged/slurmctld/slurmd
#   scripts/slurm_local.sh down            cancel jobs, stop every daemon this script started, by PID
#   scripts/slurm_local.sh status          sinfo
#   scripts/slurm_local.sh wait JOBID [S]  poll until the job ends (S seconds, default 300); prints its state
#
# Settings (environment): PREFIX (default /tmp/trb-nemo-slurm: config, state, logs, pids),
# NODES (2), CPUS_PER_NODE (2). Clients find the cluster with: source "$PREFIX/env.sh".
set -euo pipefail

PREFIX=${PREFIX:-/tmp/trb-nemo-slurm}
NODES=${NODES:-2}
CPUS_PER_NODE=${CPUS_PER_NODE:-2}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HOSTS_MARK="# trb-nemo local slurm nodes"
PIDS=$PREFIX/run/pids

log() { echo "slurm_local: $*" >&2; }

alive() {  # a PID that exists and is not a zombie
    [ -r "/proc/$1/status" ] && ! grep -q '^State:.*Z' "/proc/$1/status"
}

stop_pid() {
    local pid=$1 i
    alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 1 150); do alive "$pid" || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && [ -f /usr/include/slurm/spank.h ] && command -v gcc >/dev/null; then
        return
    fi
    [ "$(id -u)" = 0 ] || { log "installing Slurm needs root (apt-get)"; exit 2; }
    log "installing slurmctld slurmd slurm-client munge libslurm-dev gcc"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge libslurm-dev gcc libc6-dev >/dev/null
}

write_config() {
    local host node
    host=$(hostname -s)
    mkdir -p "$PREFIX"/{etc,state,log,run,lib}
    gcc -shared -fPIC -o "$PREFIX/lib/pyxis_stub.so" "$HERE/pyxis_stub.c"
    echo "required $PREFIX/lib/pyxis_stub.so" > "$PREFIX/etc/plugstack.conf"
    cat > "$PREFIX/etc/slurm.conf" <<EOF
ClusterName=trbnemo
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$PREFIX/state/ctld
SlurmdSpoolDir=$PREFIX/state/slurmd-%n
SlurmctldPidFile=$PREFIX/run/slurmctld.pid
SlurmdPidFile=$PREFIX/run/slurmd-%n.pid
SlurmctldLogFile=$PREFIX/log/slurmctld.log
SlurmdLogFile=$PREFIX/log/slurmd-%n.log
PlugStackConfig=$PREFIX/etc/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
DependencyParameters=kill_invalid_depend
MinJobAge=600
KillWait=5
InactiveLimit=0
Waittime=0
NodeName=DEFAULT CPUs=$CPUS_PER_NODE RealMemory=2048 State=UNKNOWN
EOF
    for i in $(seq 1 "$NODES"); do
        echo "NodeName=node$i NodeHostname=node$i NodeAddr=127.0.0.1 Port=$((17000 + i))" \
            >> "$PREFIX/etc/slurm.conf"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >> "$PREFIX/etc/slurm.conf"
    echo "export SLURM_CONF=$PREFIX/etc/slurm.conf" > "$PREFIX/env.sh"
    node=$(seq -f "node%g" -s " " 1 "$NODES")
    grep -v "$HOSTS_MARK" /etc/hosts > "$PREFIX/run/hosts" || true
    echo "127.0.0.1 $node $HOSTS_MARK" >> "$PREFIX/run/hosts"
    cat "$PREFIX/run/hosts" > /etc/hosts  # cat >: works on a bind-mounted /etc/hosts too
}

wait_for_file() {
    local i
    for i in $(seq 1 100); do [ -s "$1" ] && return 0; sleep 0.1; done
    log "timed out waiting for $1"; return 1
}

up() {
    down >/dev/null 2>&1 || true
    install_packages
    write_config
    export SLURM_CONF=$PREFIX/etc/slurm.conf
    : > "$PIDS"
    if ! munge -n </dev/null >/dev/null 2>&1; then  # reuse a working munged, else start ours
        install -d -o munge -g munge -m 0755 /run/munge
        runuser -u munge -- /usr/sbin/munged
        wait_for_file /run/munge/munged.pid
        echo "munged $(cat /run/munge/munged.pid)" >> "$PIDS"
    fi
    rm -rf "$PREFIX/state/ctld" && mkdir -p "$PREFIX/state/ctld"
    /usr/sbin/slurmctld -f "$SLURM_CONF" -c
    wait_for_file "$PREFIX/run/slurmctld.pid"
    echo "slurmctld $(cat "$PREFIX/run/slurmctld.pid")" >> "$PIDS"
    for i in $(seq 1 "$NODES"); do
        unshare --uts -- sh -c "hostname node$i && exec /usr/sbin/slurmd -f '$SLURM_CONF' -N node$i"
        wait_for_file "$PREFIX/run/slurmd-node$i.pid"
        echo "slurmd $(cat "$PREFIX/run/slurmd-node$i.pid")" >> "$PIDS"
    done
    for i in $(seq 1 100); do
        [ "$(sinfo -h -N -t idle -o %N | sort -u | wc -l)" -ge "$NODES" ] && { log "up: $NODES nodes idle"; return 0; }
        sleep 0.2
    done
    log "nodes did not become idle:"; sinfo -N >&2; return 1
}

down() {
    export SLURM_CONF=$PREFIX/etc/slurm.conf
    if [ -f "$SLURM_CONF" ] && [ -f "$PIDS" ] && command -v scancel >/dev/null; then
        scancel --full --user="$(id -un)" 2>/dev/null || true
        for _ in $(seq 1 30); do
            [ -z "$(squeue -h -t PENDING,CONFIGURING,RUNNING,COMPLETING 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
    if [ -f "$PIDS" ]; then
        for kind in slurmd slurmctld munged; do
            while read -r name pid; do
                [ "$name" = "$kind" ] && stop_pid "$pid"
            done < "$PIDS"
        done
        rm -f "$PIDS"
    fi
    if grep -q "$HOSTS_MARK" /etc/hosts 2>/dev/null; then
        grep -v "$HOSTS_MARK" /etc/hosts > "$PREFIX/run/hosts.down" || true
        cat "$PREFIX/run/hosts.down" > /etc/hosts
    fi
    log "down"
}

wait_job() {
    local job=$1 limit=${2:-300} state start
    export SLURM_CONF=$PREFIX/etc/slurm.conf
    start=$(date +%s)
    while :; do
        state=$(scontrol show job -o "$job" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | head -n1 | cut -d= -f2)
        case "$state" in
            COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE|PREEMPTED)
                echo "$state"; return 0 ;;
        esac
        if [ $(( $(date +%s) - start )) -ge "$limit" ]; then echo "TIMEOUT_WAITING($state)"; return 1; fi
        sleep 0.5
    done
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) export SLURM_CONF=$PREFIX/etc/slurm.conf; sinfo -N ;;
    wait) wait_job "${2:?job id}" "${3:-300}" ;;
    *) echo "usage: $0 up|down|status|wait JOBID [SECONDS]" >&2; exit 2 ;;
esac
