#!/usr/bin/env bash
# Start and stop a real SLURM cluster on this machine (Debian/Ubuntu, root, no systemd needed):
# munge + MariaDB + slurmdbd (accounting) + slurmctld + three slurmd. Node `localhost`: partitions
# `debug` (default) and `urgent` (preempts `debug`); nodes `n1`, `n2` (127.0.0.2, 127.0.0.3, added
# to /etc/hosts): partitions `multi` and `multi-urgent` (preempts `multi`), for multi-node jobs;
# with a spare `n3` (127.0.0.4): partition `multi-spare`, where a 2-node job that excludes a node
# (a hung rank's, dino/io/watchdog.py) still finds two.
# See tools/slurm/README.md.
#
#   sudo tools/slurm/slurm-local.sh install start   # CI: install once, then start
#   sudo tools/slurm/slurm-local.sh stop
#   tools/slurm/slurm-local.sh status
#
# Subcommands run in the order given. Every one is safe to repeat.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CLUSTER=ci
NODE=localhost     # partitions debug, urgent
MULTI_NODES=(n1 n2 n3) # n1, n2: multi, multi-urgent; all three: multi-spare. Each its own slurmd, address, port
NODES=("$NODE" "${MULTI_NODES[@]}")
declare -A NODE_ADDR=([n1]=127.0.0.2 [n2]=127.0.0.3 [n3]=127.0.0.4)
declare -A NODE_PORT=([n1]=6831 [n2]=6832 [n3]=6833) # localhost's slurmd has the default port, 6818
MULTI_CPUS=2
LOG_DIR=/var/log/slurm
SLURM_DIR=/etc/slurm
DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASS=slurm
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
# Advertise at least 4 CPUs (SlurmdParameters=config_overrides), more if the machine has them.
CPUS="${SLURM_LOCAL_CPUS:-$(($(nproc) > 4 ? $(nproc) : 4))}"

# daemon -> pid file. The daemon's /proc/PID/comm is the name up to the first "-": slurmd-NODE is
# the slurmd of node NODE (SlurmdPidFile=/run/slurmd-%n.pid). `slurmd` alone is the single slurmd
# of the previous (one-node) config: `stop` stops it too.
declare -A PIDFILE=(
    [munged]=/run/munge/munged.pid
    [mariadbd]=/run/mysqld/mysqld.pid
    [slurmdbd]=/run/slurmdbd.pid
    [slurmctld]=/run/slurmctld.pid
    [slurmd]=/run/slurmd.pid
)
SLURMDS=()
for n in "${NODES[@]}"; do
    PIDFILE[slurmd-$n]=/run/slurmd-$n.pid
    SLURMDS+=("slurmd-$n")
done
START_ORDER=(munged mariadbd slurmdbd slurmctld "${SLURMDS[@]}")
STOP_ORDER=(slurmd "${SLURMDS[@]}" slurmctld slurmdbd mariadbd munged)

say() { echo "slurm-local: $*"; }
die() {
    echo "slurm-local: ERROR: $*" >&2
    exit 1
}
need_root() { [ "$(id -u)" -eq 0 ] || die "'$1' must run as root (try: sudo $0 $1)"; }

# Whether a process exists and is not a zombie (PID 1 may be slow to reap a daemon that exited).
alive() { [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }
gone() { ! alive "$1"; }

# PID of a running daemon, from its pid file; fails if it is not running. A stale pid file whose
# PID now belongs to another program does not count.
daemon_pid() {
    local name=$1 file=${PIDFILE[$1]} pid
    [ -r "$file" ] || return 1
    pid=$(tr -dc 0-9 <"$file")
    [ -n "$pid" ] && alive "$pid" || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "${name%%-*}" ] || return 1
    echo "$pid"
}
running() { daemon_pid "$1" >/dev/null; }

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.2 s.
wait_for() {
    local secs=$1 what=$2 i
    shift 2
    for ((i = 0; i < secs * 5; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    return 1
}

# The daemon's own log tail, for error messages.
log_tail() { [ -r "$1" ] && tail -n 15 "$1" | sed 's/^/    /' >&2 || true; }

# ---------------------------------------------------------------------------------------------
cmd_install() {
    need_root install
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        say "install: all packages present (${PACKAGES[*]})"
        return
    fi
    export DEBIAN_FRONTEND=noninteractive
    local updated=0
    if ! apt-cache show slurmctld >/dev/null 2>&1; then
        say "install: apt-get update"
        apt-get update -qq
        updated=1
    fi
    say "install: apt-get install ${missing[*]}"
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
        [ $updated -eq 0 ] || die "apt-get install failed"
        say "install: retrying after apt-get update"
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" || die "apt-get install failed"
    fi
    say "install: done (packages start no daemons; run '$0 start')"
}

# render TEMPLATE DEST MODE: fill @NAME@ placeholders; keep a backup of a config we did not write.
render() {
    local src=$HERE/$1 dest=$2 mode=$3 tmp
    tmp=$(mktemp)
    sed -e "s|@CLUSTER@|$CLUSTER|g" -e "s|@CPUS@|$CPUS|g" -e "s|@REAL_MEMORY@|$REAL_MEMORY|g" \
        -e "s|@LOG_DIR@|$LOG_DIR|g" -e "s|@DB_NAME@|$DB_NAME|g" -e "s|@DB_USER@|$DB_USER|g" \
        -e "s|@DB_PASS@|$DB_PASS|g" -e "s|@MULTI_CPUS@|$MULTI_CPUS|g" \
        -e "s|@N1_ADDR@|${NODE_ADDR[n1]}|g" -e "s|@N1_PORT@|${NODE_PORT[n1]}|g" \
        -e "s|@N2_ADDR@|${NODE_ADDR[n2]}|g" -e "s|@N2_PORT@|${NODE_PORT[n2]}|g" \
        -e "s|@N3_ADDR@|${NODE_ADDR[n3]}|g" -e "s|@N3_PORT@|${NODE_PORT[n3]}|g" "$src" >"$tmp"
    if grep -q '@[A-Z_]*@' "$tmp"; then
        rm -f "$tmp"
        die "unfilled placeholder in $src"
    fi
    if [ -f "$dest" ] && cmp -s "$tmp" "$dest"; then
        rm -f "$tmp"
        return
    fi
    if [ -f "$dest" ] && ! grep -q "tools/slurm/$1" "$dest"; then
        say "config: keeping the previous $dest as $dest.bak.$(date +%s)"
        cp -p "$dest" "$dest.bak.$(date +%s)"
    fi
    install -m "$mode" -o root -g root "$tmp" "$dest"
    rm -f "$tmp"
    say "config: wrote $dest"
    CONFIG_CHANGED=1
}

write_configs() {
    REAL_MEMORY=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    [ -n "$REAL_MEMORY" ] || die "could not read RealMemory from 'slurmd -C'"
    mkdir -p "$SLURM_DIR" "$LOG_DIR" /var/spool/slurmctld "${NODES[@]/#//var/spool/slurmd/}"
    CONFIG_CHANGED=0
    render slurm.conf.in "$SLURM_DIR/slurm.conf" 644
    render slurmdbd.conf.in "$SLURM_DIR/slurmdbd.conf" 600
}

# /etc/hosts: n1, n2 and n3 must resolve to their loopback addresses (MASTER_ADDR=n1 for
# torch.distributed; NodeHostname). Appended once, only if the name is not there yet; a name that
# is there with another address is an error (traffic must stay on loopback).
ensure_hosts() {
    local n addr have
    for n in "${MULTI_NODES[@]}"; do
        addr=${NODE_ADDR[$n]}
        have=$(awk -v n="$n" '{ sub(/#.*/, "") } { for (i = 2; i <= NF; i++) if ($i == n) { print $1; exit } }' /etc/hosts)
        if [ -z "$have" ]; then
            say "hosts: adding '$addr $n' to /etc/hosts"
            # Append (never rewrite: /etc/hosts is often a bind mount in containers).
            [ -z "$(tail -c 1 /etc/hosts)" ] || echo >>/etc/hosts
            printf '%s %s  # dinolab tools/slurm/slurm-local.sh (node %s)\n' "$addr" "$n" "$n" >>/etc/hosts
        elif [ "$have" != "$addr" ]; then
            die "/etc/hosts maps '$n' to $have, the cluster needs $addr (a loopback address): fix /etc/hosts"
        fi
    done
}

start_munged() {
    if [ ! -s /etc/munge/munge.key ]; then
        say "munge: creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
    install -d -m 0755 -o munge -g munge /run/munge
    install -d -m 0700 -o munge -g munge /var/log/munge /var/lib/munge
    say "munge: starting munged"
    runuser -u munge -- munged --force </dev/null >>"$LOG_DIR/daemons.out" 2>&1 ||
        { log_tail /var/log/munge/munged.log; die "munged failed to start"; }
    wait_for 10 munge bash -c 'munge -n | unmunge' ||
        { log_tail /var/log/munge/munged.log; die "munge does not answer (munge -n | unmunge)"; }
}

start_mariadbd() {
    install -d -m 0755 -o mysql -g root /run/mysqld
    touch "$LOG_DIR/mariadb.log"
    chown mysql "$LOG_DIR/mariadb.log" # mariadbd writes it as user mysql
    if [ ! -d /var/lib/mysql/mysql ]; then
        say "mariadb: initialising /var/lib/mysql"
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql >>"$LOG_DIR/mariadb.log" 2>&1 ||
            { log_tail "$LOG_DIR/mariadb.log"; die "mariadb-install-db failed"; }
    fi
    say "mariadb: starting mariadbd"
    setsid -f mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid \
        --log-error="$LOG_DIR/mariadb.log" </dev/null >>"$LOG_DIR/daemons.out" 2>&1
    wait_for 60 mariadb mariadb-admin ping ||
        { log_tail "$LOG_DIR/mariadb.log"; die "mariadb does not answer (mariadb-admin ping)"; }
    wait_for 10 "mariadb pid file" running mariadbd || die "mariadbd wrote no pid file"
}

ensure_database() {
    # Idempotent; MariaDB's root logs in through its unix socket.
    mariadb -u root <<SQL || die "could not create the accounting database"
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
SQL
}

start_slurmdbd() {
    say "slurmdbd: starting"
    slurmdbd </dev/null >>"$LOG_DIR/daemons.out" 2>&1 || { log_tail "$LOG_DIR/slurmdbd.log"; die "slurmdbd failed to start"; }
    wait_for 30 slurmdbd sacctmgr -n list cluster ||
        { log_tail "$LOG_DIR/slurmdbd.log"; die "slurmdbd does not answer (sacctmgr list cluster)"; }
}

ensure_cluster() {
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        say "slurmdbd: adding cluster '$CLUSTER'"
        sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed"
    fi
}

ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

start_slurmctld() {
    say "slurmctld: starting"
    slurmctld </dev/null >>"$LOG_DIR/daemons.out" 2>&1 || { log_tail "$LOG_DIR/slurmctld.log"; die "slurmctld failed to start"; }
    wait_for 30 slurmctld ctld_up || { log_tail "$LOG_DIR/slurmctld.log"; die "slurmctld is not UP (scontrol ping)"; }
}

# start_slurmd NODE: one slurmd per node, all on this machine (slurmd -N NODE).
start_slurmd() {
    local node=$1 cpus=$CPUS where="127.0.0.1, port 6818"
    [ "$node" = "$NODE" ] || { cpus=$MULTI_CPUS where="${NODE_ADDR[$node]}, port ${NODE_PORT[$node]}"; }
    say "slurmd: starting node $node ($where, $cpus CPUs, ${REAL_MEMORY} MB)"
    slurmd -N "$node" </dev/null >>"$LOG_DIR/daemons.out" 2>&1 ||
        { log_tail "$LOG_DIR/slurmd-$node.log"; die "slurmd of node $node failed to start"; }
}

node_state() { sinfo -h -N -n "$1" -o %T 2>/dev/null | head -n 1; }
node_ready() { [[ "$(node_state "$1")" =~ ^(idle|mixed|allocated|completing)$ ]]; }
all_nodes_ready() {
    local n
    for n in "${NODES[@]}"; do node_ready "$n" || return 1; done
}
nodes_summary() {
    local n sep=""
    for n in "${NODES[@]}"; do
        printf '%s%s %s' "$sep" "$n" "$(node_state "$n")"
        sep=", "
    done
}

# Wait until every node accepts jobs; resume each (once) if it is down or drained.
wait_nodes() {
    local state n i
    local -A resumed=()
    for ((i = 0; i < 300; i++)); do
        all_nodes_ready && return 0
        for n in "${NODES[@]}"; do
            state=$(node_state "$n")
            case "$state" in
            down | drain* | down+* | drained)
                if [ -z "${resumed[$n]:-}" ]; then
                    say "node $n: $state, resuming it"
                    scontrol update NodeName="$n" State=RESUME || true
                    resumed[$n]=1
                fi
                ;;
            esac
        done
        sleep 0.2
    done
    for n in "${NODES[@]}"; do
        node_ready "$n" && continue
        state=$(node_state "$n")
        log_tail "$LOG_DIR/slurmd-$n.log"
        say "node $n is '${state:-unknown}', not idle, after 60 s"
    done
    die "nodes not idle after 60 s: $(nodes_summary) (see $LOG_DIR/slurmctld.log, slurmd-<node>.log)"
}

# The slurmd of the previous one-node config (/run/slurmd.pid) still runs: the controller and it
# know no n1/n2, and it holds localhost's port. Only a restart applies the new config.
check_old_slurmd() {
    local pid
    pid=$(daemon_pid slurmd) || return 0
    die "an old slurmd (pid $pid, ${PIDFILE[slurmd]}, from the previous one-node config) is running: apply the new config with '$0 stop start'"
}

cmd_start() {
    need_root start
    command -v slurmctld >/dev/null || die "SLURM is not installed (run: $0 install)"
    local t0=$SECONDS name all=1
    write_configs
    ensure_hosts
    check_old_slurmd
    for name in "${START_ORDER[@]}"; do running "$name" || all=0; done
    if [ $all -eq 1 ] && ctld_up && all_nodes_ready; then
        say "start: already running, nodes $(nodes_summary) (nothing to do)"
        [ "$CONFIG_CHANGED" -eq 0 ] || say "start: configs changed; apply them with '$0 stop start'"
        return
    fi
    for name in "${START_ORDER[@]}"; do
        if running "$name"; then
            say "$name: already running (pid $(daemon_pid "$name"))"
            [ "$CONFIG_CHANGED" -eq 0 ] || [[ $name != slurm* ]] || say "$name: runs with the old config; apply it with '$0 stop start'"
        else
            case $name in
            slurmd-*) start_slurmd "${name#slurmd-}" ;;
            *) "start_$name" ;;
            esac
        fi
        case $name in
        mariadbd) ensure_database ;;
        slurmdbd) ensure_cluster ;;
        esac
    done
    wait_nodes
    say "start: cluster '$CLUSTER' up in $((SECONDS - t0)) s: nodes $(nodes_summary);" \
        "partitions debug (default), urgent on $NODE; multi, multi-urgent on n1,n2; multi-spare on $(IFS=,; echo "${MULTI_NODES[*]}")"
}

cmd_stop() {
    need_root stop
    local name pid i
    for name in "${STOP_ORDER[@]}"; do
        if ! pid=$(daemon_pid "$name"); then
            # The old one-node slurmd is rarely there: no news is good news.
            [ "$name" = slurmd ] || say "$name: not running"
            continue
        fi
        [ "$name" != slurmd ] || say "slurmd: stopping the old one-node slurmd (${PIDFILE[slurmd]})"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 300; i++)); do
            alive "$pid" || break
            sleep 0.1
        done
        if alive "$pid"; then
            say "$name: still running 30 s after SIGTERM, sending SIGKILL (pid $pid)"
            kill -KILL "$pid" 2>/dev/null || true
            wait_for 10 "$name exit" gone "$pid" || die "$name (pid $pid) does not exit"
        fi
        say "$name: stopped (pid $pid, $((i / 10)).$((i % 10)) s)"
    done
    say "stop: done"
}

cmd_status() {
    local name pid
    for name in "${START_ORDER[@]}"; do
        if pid=$(daemon_pid "$name"); then
            printf '%-16s running (pid %s)\n' "$name" "$pid"
        elif [ -e "${PIDFILE[$name]}" ] && [ ! -r "${PIDFILE[$name]}" ]; then
            printf '%-16s unknown (%s is not readable: run as root)\n' "$name" "${PIDFILE[$name]}"
        else
            printf '%-16s stopped\n' "$name"
        fi
    done
    if pid=$(daemon_pid slurmd); then
        printf '%-16s running (pid %s): the old one-node slurmd; restart with: %s stop start\n' slurmd "$pid" "$0"
    fi
    if running slurmctld && command -v sinfo >/dev/null; then
        sinfo -o '%10P %.5a %.10l %.6D %.8t %.5c %.8m %N' || true
        squeue -o '%.10i %.9P %.20j %.8T %.10M %R' || true
    fi
}

cmd_env() {
    # Nothing is required: the SLURM tools read /etc/slurm/slurm.conf by default.
    echo "export SLURM_CONF=$SLURM_DIR/slurm.conf"
}

usage() {
    cat <<EOF
usage: $0 COMMAND [COMMAND...]
  install   apt-get install ${PACKAGES[*]} (what is missing)
  start     write /etc/slurm configs and the n1/n2/n3 lines of /etc/hosts, start munged, mariadbd,
            slurmdbd, slurmctld, and a slurmd for each node (${NODES[*]})
  stop      stop those daemons (by the PIDs in their pid files)
  status    daemon states, sinfo, squeue
  env       shell exports for the cluster (none needed)
EOF
}

[ $# -gt 0 ] || {
    usage >&2
    exit 2
}
for cmd in "$@"; do
    case $cmd in
    install | start | stop | status | env) "cmd_$cmd" ;;
    -h | --help | help) usage ;;
    *)
        usage >&2
        die "unknown command '$cmd'"
        ;;
    esac
done
