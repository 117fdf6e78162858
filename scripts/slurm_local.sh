#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for trying and testing the Slurm path (run as root):
#   scripts/slurm_local.sh          install slurm-wlm and munge if missing, write the config, start, wait
#   scripts/slurm_local.sh stop     stop slurmd, slurmctld and munged
# Idempotent: when the node already answers idle, it returns at once. Debian/Ubuntu (apt-get).
# One node (this host, its CPUs and memory), one partition `debug`, no accounting, no cgroups.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
NODE=$(hostname -s)
TIMEOUT_S=${SLURM_LOCAL_TIMEOUT_S:-60}

log() { echo "slurm_local: $*" >&2; }

up() {
  # idle, mixed or allocated: the controller answers and the node takes jobs
  case "$(timeout 10 sinfo -h -n "$NODE" -o %t 2>/dev/null | head -1)" in
    idle* | mix* | alloc*) return 0 ;;
    *) return 1 ;;
  esac
}

stop() {
  local name pidfile pid
  for name in slurmd slurmctld munged; do
    pidfile=/run/slurm/$name.pid
    [[ $name == munged ]] && pidfile=/run/munge/munged.pid
    [[ -f $pidfile ]] || continue
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
      # wait for it to exit (slurmctld saves its state first), so that a restart finds it gone
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
      log "stopped $name ($pid)"
    fi
    rm -f "$pidfile"
  done
}

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null &&
    command -v sbatch >/dev/null; then
    return
  fi
  log "installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_conf() {
  local hw cpus mem
  hw=$(slurmd -C | head -1)
  cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
  local new
  new=$(
    cat <<EOF
# Written by scripts/slurm_local.sh: one node (this host), one partition, no accounting.
ClusterName=local
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=5
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
# Quick turnaround for short test jobs: pending jobs (a requeued one, once eligible) are scheduled
# within a second, SIGKILL comes 5 s after SIGTERM, ended jobs stay listed by squeue for 5 min.
SchedulerParameters=sched_interval=1,bf_interval=1
KillWait=5
MinJobAge=300
NodeName=$NODE CPUs=$cpus RealMemory=$mem State=UNKNOWN
# OverSubscribe: each CPU may be given to 4 jobs at once, so that small test tasks run side by side.
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
  )
  if [[ ! -f $CONF ]] || [[ "$(cat "$CONF")" != "$new" ]]; then
    echo "$new" >"$CONF"
    log "wrote $CONF (node $NODE, $cpus CPUs, $mem MB)"
    return 1 # changed: restart
  fi
}

start() {
  install
  local changed=0
  write_conf || changed=1
  if ((changed == 0)) && up; then
    log "node $NODE is up"
    return
  fi
  ((changed == 0)) || stop
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
  if [[ ! -f /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  fi
  if ! munge -n </dev/null >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
  fi
  if ! pgrep -x slurmctld >/dev/null; then slurmctld -c; fi
  if ! pgrep -x slurmd >/dev/null; then slurmd; fi
  local deadline=$((SECONDS + TIMEOUT_S))
  until up; do
    if ((SECONDS > deadline)) || ! pgrep -x slurmctld >/dev/null || ! pgrep -x slurmd >/dev/null; then
      log "node $NODE not idle (${SECONDS}s): $(sinfo 2>&1 | tail -n +2)"
      tail -n 5 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
      return 1
    fi
    # a node that was down (an earlier run) is brought back
    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
    sleep 0.5
  done
  log "node $NODE is up ($((SECONDS))s)"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  *)
    echo "usage: $0 [start|stop]" >&2
    exit 2
    ;;
esac
