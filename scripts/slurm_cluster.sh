#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for tests and trying `--executor slurm` out.
#
#   scripts/slurm_cluster.sh start     install the Debian packages if missing (as root), write a slurm.conf
#                                      naming this host, start munged (unless one already answers),
#                                      slurmctld and slurmd, wait until `sinfo` shows the node idle
#   scripts/slurm_cluster.sh stop      cancel this cluster's jobs, end the daemons `start` started (by
#                                      their recorded pids, nothing else)
#   scripts/slurm_cluster.sh status    the recorded daemons and `sinfo`
#
# Everything lives in $MEDCERT_SLURM_DIR (default /tmp/medcert-slurm): slurm.conf, state, spool,
# logs, and `pids` (one "name pid" per line). Clients find the cluster through SLURM_CONF:
#   export SLURM_CONF=$MEDCERT_SLURM_DIR/slurm.conf        (start prints this line)
# Ports: $MEDCERT_SLURMCTLD_PORT (default 6817) and $MEDCERT_SLURMD_PORT (default 6818).
# As root: SlurmUser=root, ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, no accounting
# (sacct then says that accounting storage is disabled; submitit tolerates it).
set -euo pipefail

STATE="${MEDCERT_SLURM_DIR:-/tmp/medcert-slurm}"
CONF="$STATE/slurm.conf"
PIDS="$STATE/pids"
CTLD_PORT="${MEDCERT_SLURMCTLD_PORT:-6817}"
SLURMD_PORT="${MEDCERT_SLURMD_PORT:-6818}"
WAIT_S="${MEDCERT_SLURM_WAIT_S:-60}"
export SLURM_CONF="$CONF"

log() { echo "[slurm_cluster] $*" >&2; }

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  command -v munged >/dev/null || missing+=(munge)
  [ "${#missing[@]}" -eq 0 ] && return 0
  local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  log "installing ${missing[*]} (apt-get)"
  $sudo apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends \
    slurmctld slurmd slurm-client munge >&2
}

# pid -> alive and still the program recorded for it (a recycled pid is never signalled)
ours() {
  local name="$1" pid="$2"
  [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$name" ]
}

munge_answers() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

write_conf() {
  local host node memory
  host="$(hostname -s)"
  # slurmd -C: "NodeName=<host> CPUs=.. Boards=.. SocketsPerBoard=.. CoresPerSocket=.. ThreadsPerCore=.. RealMemory=.."
  node="$(slurmd -C | head -n 1)"
  memory="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")"
  node="$(sed "s/RealMemory=[0-9]*/RealMemory=$((memory * 95 / 100))/" <<<"$node")"  # margin: never drained for memory
  cat >"$CONF" <<EOF
# written by scripts/slurm_cluster.sh: one node, this host, everything run as root
ClusterName=medcert
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_daemon() {  # name command...: started in the foreground mode, in the background; pid recorded
  local name="$1"; shift
  "$@" >>"$STATE/log/$name.out" 2>&1 &
  echo "$name $!" >>"$PIDS"
}

start() {
  if [ -s "$PIDS" ]; then
    while read -r name pid; do
      if ours "$name" "$pid"; then
        log "already running ($name pid $pid); stop it first: $0 stop"; exit 1
      fi
    done <"$PIDS"
  fi
  install_packages
  mkdir -p "$STATE/state" "$STATE/spool" "$STATE/log"
  : >"$PIDS"
  write_conf
  if ! munge_answers; then
    install -d -o munge -g munge -m 0755 /run/munge
    start_daemon munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground
    for _ in $(seq 50); do munge_answers && break; sleep 0.2; done
    munge_answers || { log "munged did not start; see $STATE/log/munged.out"; exit 1; }
  fi
  start_daemon slurmctld slurmctld -D -c -f "$CONF"   # -c: no jobs from an earlier cluster
  start_daemon slurmd slurmd -D -f "$CONF"
  local host state=""
  host="$(hostname -s)"
  for _ in $(seq "$((WAIT_S * 2))"); do
    state="$(sinfo -h -N -n "$host" -o %t 2>/dev/null | head -n 1 || true)"
    [ "$state" = "idle" ] && break
    sleep 0.5
  done
  if [ "$state" != "idle" ]; then
    log "node $host is not idle after ${WAIT_S} s (state: '${state:-no answer}'); logs in $STATE/log"
    tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
    stop; exit 1
  fi
  log "node $host idle; pids in $PIDS"
  echo "export SLURM_CONF=$CONF"
}

stop() {
  [ -s "$PIDS" ] || { log "nothing recorded in $PIDS"; return 0; }
  local jobs
  jobs="$(squeue -h -o %i 2>/dev/null || true)"
  [ -n "$jobs" ] && scancel $jobs 2>/dev/null || true
  local names=() pids=()
  while read -r name pid; do names+=("$name"); pids+=("$pid"); done <"$PIDS"
  local index
  for ((index = ${#pids[@]} - 1; index >= 0; index--)); do  # slurmd, slurmctld, then munged
    ours "${names[index]}" "${pids[index]}" && kill "${pids[index]}" 2>/dev/null || true
  done
  for _ in $(seq 50); do
    local alive=0
    for index in "${!pids[@]}"; do ours "${names[index]}" "${pids[index]}" && alive=1; done
    [ "$alive" -eq 0 ] && break
    sleep 0.2
  done
  for index in "${!pids[@]}"; do
    if ours "${names[index]}" "${pids[index]}"; then
      log "${names[index]} (pid ${pids[index]}) ignored SIGTERM: SIGKILL"
      kill -9 "${pids[index]}" 2>/dev/null || true
    fi
  done
  rm -f "$PIDS"
  log "stopped"
}

status() {
  [ -s "$PIDS" ] && while read -r name pid; do
    if ours "$name" "$pid"; then echo "$name $pid running"; else echo "$name $pid gone"; fi
  done <"$PIDS"
  sinfo 2>&1 || true
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
