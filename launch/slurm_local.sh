#!/usr/bin/env bash
# Provision and control a REAL local SLURM cluster (Debian's Slurm 22.05) with
# two emulated nodes, n1 and n2, on this single machine: for tests, demos, CI.
#
#   bash launch/slurm_local.sh up       # install (if needed), configure, start, wait for idle nodes
#   bash launch/slurm_local.sh down     # stop every daemon this script starts
#   bash launch/slurm_local.sh status   # sinfo + per-daemon state; exit 0 iff all up
#
# Containers/VMs here have no systemd and refuse init scripts, so every daemon
# (munged, mysqld_safe/mariadbd, slurmdbd, slurmctld, slurmd x2) is started
# directly and tracked through its pid file; `down` only signals those pids.
#
# Overridable through the environment:
#   W2W_SLURM_CLUSTER  cluster name registered in slurmdbd (default: w2w)
#   W2W_SLURM_TIMEOUT  seconds to wait for each daemon / the nodes (default: 60)
set -euo pipefail

readonly CLUSTER_NAME="${W2W_SLURM_CLUSTER:-w2w}"
readonly WAIT_S="${W2W_SLURM_TIMEOUT:-60}"
readonly PARTITION="debug"
readonly NODES=(n1 n2)
# Each emulated node offers all host cores, at least 2 so that a job with
# --nodes=1 --ntasks-per-node=2 fits (config_overrides permits overcommit).
NODE_CPUS=$(nproc)
((NODE_CPUS >= 2)) || NODE_CPUS=2
readonly NODE_CPUS
readonly NODE_MEM_MB=8000     # modest, and not checked against the host (config_overrides)
readonly PACKAGES=(munge mariadb-server slurmdbd slurmctld slurmd slurm-client)

readonly CONF_DIR=/etc/slurm
readonly SLURM_CONF="$CONF_DIR/slurm.conf"
readonly SLURMDBD_CONF="$CONF_DIR/slurmdbd.conf"
readonly LOG_DIR=/var/log/slurm
readonly RUN_DIR=/run/slurm
readonly CTLD_STATE_DIR=/var/spool/slurmctld
readonly SLURMD_SPOOL=/var/spool/slurmd
readonly MUNGE_KEY=/etc/munge/munge.key
readonly MUNGE_PID=/run/munge/munged.pid
readonly MYSQLD_PID=/run/mysqld/mysqld.pid
readonly MYSQLD_SAFE_PID="$RUN_DIR/mysqld_safe.pid"
readonly MYSQLD_LOG=/var/log/mysql/error.log  # written as user mysql
readonly SLURMDBD_PID="$RUN_DIR/slurmdbd.pid"
readonly SLURMCTLD_PID="$RUN_DIR/slurmctld.pid"
# Local-only credential: MariaDB listens on localhost only and the DB holds
# nothing but this throwaway cluster's accounting.
readonly DB_NAME=slurm_acct_db
readonly DB_USER=slurm
readonly DB_PASS=w2w-local-slurmdbd

SCRIPT_T0=$(date +%s)
readonly SCRIPT_T0

log() { printf '[slurm_local] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

slurmd_pidfile() { printf '%s/slurmd-%s.pid' "$RUN_DIR" "$1"; }
slurmd_logfile() { printf '%s/slurmd-%s.log' "$LOG_DIR" "$1"; }

# "name|pidfile|comm regex" of slurmctld and every slurmd (see stop_pids).
SLURM_ENTRIES=("slurmctld|$SLURMCTLD_PID|slurmctld")
for _n in "${NODES[@]}"; do SLURM_ENTRIES+=("slurmd $_n|$(slurmd_pidfile "$_n")|slurmd"); done
unset _n
readonly SLURM_ENTRIES

# Print the pid recorded in pidfile $1 if that process is alive and its name
# matches the regex $2 (guards against stale pid files and recycled pids).
pid_of() {
  local pidfile=$1 comm_re=$2 pid comm
  [[ -r $pidfile ]] || return 1
  pid=$(tr -dc '0-9' <"$pidfile")
  [[ -n $pid ]] || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  [[ $comm =~ ^($comm_re)$ ]] || return 1
  printf '%s\n' "$pid"
}
running() { pid_of "$@" >/dev/null; }

# Poll command "$@" once a second until it succeeds or WAIT_S elapse.
wait_for() {
  local what=$1 i; shift
  for ((i = 0; i < WAIT_S; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  log "timed out after ${WAIT_S}s waiting for $what"
  return 1
}

# wait_ready WHAT PIDFILE COMM_RE LOG CMD...: poll once a second until the
# daemon runs and CMD succeeds; fail fast (with LOG) when the daemon died,
# checked from the 3rd second on (daemons fork before writing their pid file).
wait_ready() {
  local what=$1 pidfile=$2 comm_re=$3 logfile=$4 i; shift 4
  for ((i = 0; i < WAIT_S; i++)); do
    if running "$pidfile" "$comm_re" && "$@" >/dev/null 2>&1; then return 0; fi
    if ((i >= 2)) && ! running "$pidfile" "$comm_re"; then
      fail_with_logs "$what is not running" "$logfile"
    fi
    sleep 1
  done
  fail_with_logs "$what not ready after ${WAIT_S}s" "$logfile"
}

# Print the last lines of the given logs (to explain a failure).
show_logs() {
  local f
  for f in "$@"; do
    [[ -r $f ]] || continue
    log "---- tail of $f ----"
    tail -n 25 "$f" >&2 || true
  done
}

fail_with_logs() {
  local msg=$1; shift
  show_logs "$@"
  die "$msg (logs: $*)"
}

# --------------------------------------------------------------------------
# Installation
# --------------------------------------------------------------------------

pkg_installed() {
  [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]
}

install_packages() {
  local missing=() p t0 created_policy=0
  for p in "${PACKAGES[@]}"; do
    pkg_installed "$p" || missing+=("$p")
  done
  ((${#missing[@]} == 0)) && return 0

  t0=$(date +%s)
  log "installing: ${missing[*]}"
  # Keep maintainer scripts from starting daemons via invoke-rc.d: we start
  # them ourselves, with our configs, and a stray mariadbd would hold the port.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    created_policy=1
  fi
  local rc=0
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } || rc=$?
  if ((created_policy)); then rm -f /usr/sbin/policy-rc.d; fi
  ((rc == 0)) || die "apt-get failed (rc=$rc) installing: ${missing[*]}"
  log "packages installed in $(($(date +%s) - t0))s"
}

# --------------------------------------------------------------------------
# Configuration (files are only rewritten when their content changes)
# --------------------------------------------------------------------------

# write_file PATH MODE OWNER < content ; returns 0 if the file changed.
write_file() {
  local path=$1 mode=$2 owner=$3 tmp
  tmp=$(mktemp)
  cat >"$tmp"
  if [[ -f $path ]] && cmp -s "$tmp" "$path"; then
    rm -f "$tmp"
    chmod "$mode" "$path"; chown "$owner" "$path"
    return 1
  fi
  install -m "$mode" -o "${owner%%:*}" -g "${owner##*:}" "$tmp" "$path"
  rm -f "$tmp"
  return 0
}

# The emulated node names must resolve: the first node of a job's nodelist is
# used as rendezvous address (torch.distributed / submitit MASTER_ADDR).
ensure_hosts() {
  local n
  for n in "${NODES[@]}"; do
    if ! awk -v n="$n" '$1 !~ /^#/ { for (i = 2; i <= NF; i++) if ($i == n) f = 1 } END { exit !f }' /etc/hosts; then
      printf '127.0.0.1 %s\n' "$n" >>/etc/hosts
    fi
  done
}

ensure_dirs() {
  local n
  install -d -m 755 -o slurm -g slurm "$LOG_DIR" "$RUN_DIR" "$CTLD_STATE_DIR"
  install -d -m 755 -o root -g root "$SLURMD_SPOOL"
  for n in "${NODES[@]}"; do
    install -d -m 755 -o root -g root "$SLURMD_SPOOL/$n"
  done
  install -d -m 755 -o munge -g munge /run/munge
  install -d -m 700 -o munge -g munge /var/lib/munge /var/log/munge
  install -d -m 755 -o mysql -g mysql /run/mysqld
  install -d -m 2750 -o mysql -g adm /var/log/mysql
}

ensure_munge_key() {
  if [[ ! -s $MUNGE_KEY ]]; then
    log "creating $MUNGE_KEY"
    dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
  fi
  chown munge:munge "$MUNGE_KEY"
  chmod 400 "$MUNGE_KEY"
}

# Writes slurm.conf and slurmdbd.conf; returns 0 if slurm.conf changed.
write_configs() {
  local host changed=1
  host=$(hostname -s)
  install -d -m 755 "$CONF_DIR"

  write_file "$SLURMDBD_CONF" 600 slurm:slurm <<EOF || true
# Generated by launch/slurm_local.sh -- local test cluster, do not edit.
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
LogFile=$LOG_DIR/slurmdbd.log
PidFile=$SLURMDBD_PID
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=$DB_NAME
StorageUser=$DB_USER
StoragePass=$DB_PASS
EOF

  # Why some settings:
  #  - SlurmctldHost=<host>(127.0.0.1): slurmctld checks that its own short
  #    hostname is the controller; the address keeps traffic on loopback.
  #  - Two slurmd on one host: distinct Port per node, %n in spool/pid/log.
  #  - proctrack/linuxproc + task/none: no cgroups needed (containers/VMs).
  #  - SlurmdParameters=config_overrides: nodes register with the CPUs and
  #    RealMemory below even though both slurmd see the same host.
  #  - CR_CPU: CPUs are the only consumable, so single-task jobs pack 2 per
  #    node and memory never blocks scheduling (no --mem needed).
  #  - Short timeouts so failures and restarts surface in seconds.
  write_file "$SLURM_CONF" 644 root:root <<EOF && changed=0
# Generated by launch/slurm_local.sh -- local test cluster, do not edit.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$host(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$CTLD_STATE_DIR
SlurmdSpoolDir=$SLURMD_SPOOL/%n
SlurmctldPidFile=$SLURMCTLD_PID
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info

ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
SlurmdParameters=config_overrides
ReturnToService=2

SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5,batch_sched_delay=0,default_queue_depth=200
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU

SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=5
InactiveLimit=0
KillWait=2
OverTimeLimit=0
MinJobAge=300
Waittime=0

AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30

NodeName=n[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=17001-17002 CPUs=$NODE_CPUS RealMemory=$NODE_MEM_MB State=UNKNOWN
PartitionName=$PARTITION Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
  return "$changed"
}

# slurmctld refuses to start ("CLUSTER NAME MISMATCH") on state saved under
# another ClusterName: this is a throwaway cluster, so drop that state.
ensure_state_dir() {
  local f="$CTLD_STATE_DIR/clustername"
  if [[ -s $f && $(<"$f") != "$CLUSTER_NAME" ]] && ! running "$SLURMCTLD_PID" slurmctld; then
    log "dropping slurmctld state of cluster $(<"$f")"
    find "$CTLD_STATE_DIR" -mindepth 1 -delete
  fi
}

# --------------------------------------------------------------------------
# Daemons
# --------------------------------------------------------------------------

start_munge() {
  running "$MUNGE_PID" munged && return 0
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged
  wait_for "munge" bash -c 'munge -n | unmunge' \
    || fail_with_logs "munged did not come up" /var/log/munge/munged.log
}

start_mariadb() {
  local i started=0
  if ! running "$MYSQLD_PID" 'mariadbd|mysqld'; then
    started=1
    log "starting MariaDB (mysqld_safe)"
    # Slurm recommends a long lock timeout. Its buffer-pool advice (>=512M)
    # is ignored to stay small: slurmdbd then logs a harmless "Database
    # settings not recommended values: innodb_buffer_pool_size". Debian's
    # mysqld_safe config logs to syslog, which containers lack: use a file.
    setsid nohup mysqld_safe --skip-syslog --log-error="$MYSQLD_LOG" \
      --innodb-lock-wait-timeout=900 >/dev/null 2>&1 </dev/null &
    echo $! >"$MYSQLD_SAFE_PID"
  fi
  for ((i = 0; ; i++)); do
    mysqladmin --protocol=socket -u root ping >/dev/null 2>&1 && break
    # Fail fast when mysqld_safe gave up (it exits if mariadbd cannot start);
    # from i=2 on, once setsid/nohup have surely exec'ed into mysqld_safe.
    if ((i >= WAIT_S)) || { ((started && i >= 2)) && ! running "$MYSQLD_SAFE_PID" mysqld_safe; }; then
      fail_with_logs "MariaDB did not come up" "$MYSQLD_LOG"
    fi
    sleep 1
  done
  # root authenticates through the unix socket (Debian default).
  mysql --protocol=socket -u root <<EOF
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
EOF
}

start_slurmdbd() {
  if ! running "$SLURMDBD_PID" slurmdbd; then
    log "starting slurmdbd"
    slurmdbd || fail_with_logs "slurmdbd failed to start" "$LOG_DIR/slurmdbd.log"
  fi
  wait_ready slurmdbd "$SLURMDBD_PID" slurmdbd "$LOG_DIR/slurmdbd.log" sacctmgr -n list cluster
}

# slurmctld must find its cluster in slurmdbd at startup.
ensure_cluster() {
  if [[ -z $(sacctmgr -n -P list cluster "$CLUSTER_NAME" format=cluster) ]]; then
    log "registering cluster $CLUSTER_NAME in slurmdbd"
    sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
  fi
}

start_slurmctld() {
  if ! running "$SLURMCTLD_PID" slurmctld; then
    log "starting slurmctld"
    slurmctld || fail_with_logs "slurmctld failed to start" "$LOG_DIR/slurmctld.log"
  fi
  wait_ready slurmctld "$SLURMCTLD_PID" slurmctld "$LOG_DIR/slurmctld.log" scontrol ping
}

# node -> epoch second at which this run started its slurmd
declare -A SLURMD_STARTED=()

start_slurmds() {
  local n
  for n in "${NODES[@]}"; do
    running "$(slurmd_pidfile "$n")" slurmd && continue
    log "starting slurmd -N $n"
    SLURMD_STARTED[$n]=$(date +%s)
    slurmd -N "$n" || fail_with_logs "slurmd $n failed to start" "$(slurmd_logfile "$n")"
  done
}

# True once a slurmd started by this run has registered with slurmctld (its
# SlurmdStartTime is recent): sinfo still shows the old state until then.
slurmd_registered() {
  local n=$1 t
  [[ -n ${SLURMD_STARTED[$n]:-} ]] || return 0
  t=$(scontrol show node "$n" -o 2>/dev/null | grep -o 'SlurmdStartTime=[^ ]*') || return 1
  t=$(date -d "${t#*=}" +%s 2>/dev/null) || return 1
  ((t >= SLURMD_STARTED[$n] - 1))
}

# Compact node state from sinfo, e.g. "idle", "mix", "down*", "drain".
node_state() { sinfo -h -N -n "$1" -o '%t' 2>/dev/null | head -n 1; }

node_usable() {
  slurmd_registered "$1" || return 1
  case $(node_state "$1") in
    idle | mix | alloc | comp) return 0 ;; # no '*' suffix: it responds
    *) return 1 ;;
  esac
}

all_nodes_usable() {
  local n
  for n in "${NODES[@]}"; do node_usable "$n" || return 1; done
}

# Wait until every slurmd runs and every node is usable (registered, and idle
# or busy with someone's jobs); sinfo alone is not enough, as slurmctld
# notices a dead slurmd only after SlurmdTimeout. Nodes left drained/down by an earlier
# unclean stop are resumed once: ReturnToService=2 only revives nodes that
# were DOWN for not responding.
wait_nodes() {
  local i n st resumed=0 logs=("$LOG_DIR/slurmctld.log")
  for n in "${NODES[@]}"; do logs+=("$(slurmd_logfile "$n")"); done
  for ((i = 0; i < WAIT_S; i++)); do
    if ((i >= 2)); then
      for n in "${NODES[@]}"; do
        running "$(slurmd_pidfile "$n")" slurmd \
          || fail_with_logs "slurmd $n is not running" "$(slurmd_logfile "$n")"
      done
    fi
    all_daemons_running && all_nodes_usable && return 0
    if ((i >= 5 && !resumed)); then
      for n in "${NODES[@]}"; do
        st=$(node_state "$n")
        if [[ $st =~ ^(drain|drng|down|fail)$ ]]; then
          log "node $n is $st: resuming it"
          scontrol update NodeName="$n" State=RESUME || true
        fi
      done
      resumed=1
    fi
    sleep 1
  done
  sinfo -N >&2 || true
  fail_with_logs "nodes ${NODES[*]} not idle after ${WAIT_S}s" "${logs[@]}"
}

# stop_pids "NAME|PIDFILE|COMM_RE"...: SIGTERM them all at once, wait up to
# 20s for all of them to exit, then SIGKILL the stragglers.
stop_pids() {
  local entry name pidfile comm_re pid i pids=()
  for entry in "$@"; do
    IFS='|' read -r name pidfile comm_re <<<"$entry"
    pid=$(pid_of "$pidfile" "$comm_re") || continue
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    pids+=("$pid")
  done
  for ((i = 0; i < 80; i++)); do
    local alive=()
    for pid in "${pids[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then alive+=("$pid"); fi
    done
    ((${#alive[@]})) || return 0
    pids=("${alive[@]}")
    sleep 0.25
  done
  log "pids ${pids[*]} did not exit: SIGKILL"
  kill -KILL "${pids[@]}" 2>/dev/null || true
}

stop_mariadb() {
  local safe_pid
  if running "$MYSQLD_PID" 'mariadbd|mysqld'; then
    log "stopping MariaDB"
    # A clean shutdown also makes mysqld_safe exit instead of restarting it.
    mysqladmin --protocol=socket -u root shutdown 2>/dev/null \
      || stop_pids "mariadbd|$MYSQLD_PID|mariadbd|mysqld"
  fi
  if safe_pid=$(pid_of "$MYSQLD_SAFE_PID" 'mysqld_safe'); then
    wait_for "mysqld_safe to exit" bash -c "! kill -0 $safe_pid" \
      || kill -TERM "$safe_pid" 2>/dev/null || true
  fi
  rm -f "$MYSQLD_SAFE_PID"
}

# --------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------

require_root() {
  if ((EUID != 0)); then
    echo "local SLURM needs root (apt-get and daemons): run as root or use a real cluster" >&2
    exit 3
  fi
}

daemon_table() {
  # name|pidfile|comm regex
  printf '%s\n' \
    "munged|$MUNGE_PID|munged" \
    "mariadbd|$MYSQLD_PID|mariadbd|mysqld" \
    "slurmdbd|$SLURMDBD_PID|slurmdbd" \
    "slurmctld|$SLURMCTLD_PID|slurmctld"
  local n
  for n in "${NODES[@]}"; do
    printf 'slurmd(%s)|%s|slurmd\n' "$n" "$(slurmd_pidfile "$n")"
  done
}

all_daemons_running() {
  local name pidfile comm_re
  while IFS='|' read -r name pidfile comm_re; do
    running "$pidfile" "$comm_re" || return 1
  done < <(daemon_table)
}

cmd_up() {
  require_root
  install_packages
  ensure_hosts
  ensure_dirs
  ensure_munge_key
  if write_configs; then
    # Node definitions cannot be reconfigured live: restart the Slurm side
    # (a no-op on first start; running jobs survive a slurmd restart).
    stop_pids "${SLURM_ENTRIES[@]}"
  fi
  ensure_state_dir
  if ! (all_daemons_running && all_nodes_usable); then
    start_munge
    start_mariadb
    start_slurmdbd
    ensure_cluster
    start_slurmctld
    start_slurmds
    wait_nodes
  fi
  echo "local SLURM up: cluster=$CLUSTER_NAME partition=$PARTITION nodes=${NODES[*]} (${NODE_CPUS} CPUs, ${NODE_MEM_MB} MB each)" \
    "conf=$SLURM_CONF logs=$LOG_DIR ($(($(date +%s) - SCRIPT_T0))s)"
}

# slurmstepd and job processes outlive slurmd by design, so a bare `down`
# would leave orphans and slurmctld would resurrect the jobs on the next `up`:
# cancel every job while the daemons can still kill and account for them.
cancel_jobs() {
  local jobs i
  running "$SLURMCTLD_PID" slurmctld || return 0
  jobs=$(squeue -h -o '%i' 2>/dev/null | tr '\n' ' ') || return 0
  [[ -n ${jobs// /} ]] || return 0
  log "cancelling jobs: $jobs"
  # shellcheck disable=SC2086 # one argument per job id
  scancel $jobs || true
  for ((i = 0; i < 60; i++)); do
    [[ -z $(squeue -h -o '%i' 2>/dev/null) ]] && return 0
    sleep 0.5
  done
  log "warning: jobs still listed after 30s:"
  squeue >&2 || true
}

cmd_down() {
  require_root
  cancel_jobs
  # slurmctld and the slurmds together (no ordering needed between them),
  # then slurmdbd, so slurmctld can flush its last accounting records to it.
  stop_pids "${SLURM_ENTRIES[@]}"
  stop_pids "slurmdbd|$SLURMDBD_PID|slurmdbd"
  stop_mariadb
  stop_pids "munged|$MUNGE_PID|munged"
  echo "local SLURM down"
}

cmd_status() {
  local name pidfile comm_re pid rc=0
  if command -v sinfo >/dev/null && running "$SLURMCTLD_PID" slurmctld; then
    sinfo -N -o '%N %P %t %c %m' || rc=1
    all_nodes_usable || rc=1
  else
    echo "sinfo: slurmctld not running"
    rc=1
  fi
  while IFS='|' read -r name pidfile comm_re; do
    if pid=$(pid_of "$pidfile" "$comm_re"); then
      printf '%-12s running (pid %s)\n' "$name" "$pid"
    else
      printf '%-12s stopped\n' "$name"
      rc=1
    fi
  done < <(daemon_table)
  return "$rc"
}

main() {
  case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *)
      echo "usage: $0 up|down|status" >&2
      exit 2
      ;;
  esac
}

main "$@"
