#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for testing the slurm profile (tests/test_slurm.py) and for
# trying the workflow's cluster path without a cluster. Not for production.
#
#   scripts/slurm/local_cluster.sh install   # apt-get install slurm-wlm munge (Debian/Ubuntu, as root)
#   scripts/slurm/local_cluster.sh start     # write slurm.conf, start munged, slurmctld, slurmd
#   scripts/slurm/local_cluster.sh status    # sinfo
#   scripts/slurm/local_cluster.sh stop
#
# Runs as root (the daemons need it; sudo is not assumed). State lives in $BONEDRR_SLURM_DIR
# (default /tmp/bonedrr-slurm). The node offers every CPU and all but 1 GiB of memory; no accounting
# database, so Snakemake's slurm executor must query job state with squeue
# (--slurm-status-command squeue, set by profiles/slurm-local), and MinJobAge keeps finished jobs
# visible to squeue long enough.
set -euo pipefail

STATE=${BONEDRR_SLURM_DIR:-/tmp/bonedrr-slurm}
CONF_DIR=/etc/slurm
HOST=$(hostname -s)

die() { echo "local_cluster.sh: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "run as root (slurmd and munged need it)"

write_conf() {
    local cpus mem
    cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS: a shell limiting
                                                              # its BLAS threads would get a 1-CPU node
    mem=$(( $(free -m | awk '/^Mem:/ {print $2}') - 1024 ))
    mkdir -p "$CONF_DIR" "$STATE"/{spool/ctld,spool/d,log}
    cat > "$CONF_DIR/slurm.conf" <<CONF
ClusterName=bonedrr-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
ReturnToService=2
SchedulerType=sched/backfill
NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=main Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
}

start() {
    command -v slurmctld >/dev/null || die "slurm is not installed: run '$0 install' first"
    write_conf
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge && dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    fi
    chown -R munge:munge /etc/munge 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged 2>/dev/null || /usr/sbin/munged --force
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    for _ in $(seq 1 30); do
        if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
            sinfo
            return 0
        fi
        scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    sinfo || true
    die "the node did not become idle within 30 s; see $STATE/log/"
}

stop() {
    pkill -x slurmd || true
    pkill -x slurmctld || true
    pkill -x munged || true
}

case "${1:-}" in
    install) apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge ;;
    start) start ;;
    status) sinfo ;;
    stop) stop ;;
    *) die "usage: $0 install|start|status|stop" ;;
esac
