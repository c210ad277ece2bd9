#!/usr/bin/env bash
# A Slurm cluster on this machine, for tests and for trying the Slurm scripts: munged +
# slurmctld + slurmd, everything (key, config, state, spool, logs, sockets) under DIR.
#
#   scripts/slurm/local-cluster.sh start DIR     # one node: this host; prints the SLURM_CONF line
#   scripts/slurm/local-cluster.sh start DIR --nodes 2   # two compute nodes, each in network,
#                                                # UTS and mount namespaces of its own
#   export SLURM_CONF=DIR/slurm.conf
#   sbatch scripts/slurm/train.sbatch configs/demo-cpu.yaml ...; squeue; scontrol show job N
#   scripts/slurm/local-cluster.sh stop DIR      # kills remaining jobs, stops the daemons
#   scripts/slurm/local-cluster.sh status DIR
#
# With --nodes N, node i (NAMEn1 ... NAMEnN) is a slurmd in a network namespace with the address
# SUBNET.(10+i) on a bridge whose address SUBNET.1 is the controller's, in a UTS namespace (its
# hostname is the node name) and a mount namespace where DIR/hosts (the cluster's names) is
# /etc/hosts. Its jobs inherit all three: a job's processes on node i see its hostname and
# address, reach the other nodes over the bridge, and share this machine's file system (as
# nodes share a network file system). Needs iproute2 (`ip`) and util-linux (`unshare`).
#
# Needs root (slurmd runs jobs as their submitting user) and the Debian packages:
#   apt-get install -y slurm-wlm munge iproute2
# Environment (optional): SLURMCTLD_PORT, SLURMD_PORT (default 6817, 6818; pick free ports when
# several clusters may run), LOCAL_CLUSTER_KILLWAIT (seconds between SIGTERM and SIGKILL when a
# job ends, default 90: time for the trainer to finish its step and save a checkpoint),
# LOCAL_CLUSTER_REQUEUE_DELAY (seconds before a requeued job may start again, default 10; Slurm's
# default is 120), LOCAL_CLUSTER_CPUS (per node, default: nproc; more is
# accepted: jobs then share the cores), LOCAL_CLUSTER_NAME (default tstlocal),
# LOCAL_CLUSTER_SUBNET (with --nodes: the bridge's /24 as three numbers, default 10.X.Y from a
# hash of DIR).
set -euo pipefail

usage() {
    sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

die() {
    echo "local-cluster.sh: $*" >&2
    exit 1
}

need() {
    local tool
    for tool in "$@"; do
        command -v "$tool" > /dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$tool" \
            > /dev/null 2>&1 || die "'$tool' not found; install Slurm and munge with: apt-get install -y slurm-wlm munge"
    done
}

[[ $# -eq 2 || ($# -eq 4 && $1 == start && $3 == --nodes) ]] || usage
action=$1
dir=$2
nodes=${4:-0}  # 0: this host is the one node; N: N nodes in namespaces
[[ $nodes =~ ^[0-9]$ ]] || die "--nodes takes a number of nodes from 1 to 9, got '$nodes'"
PATH="$PATH:/usr/sbin:/sbin"
export SLURM_CONF="$dir/slurm.conf"

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" > /dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            echo "local-cluster.sh: timed out after ${seconds}s waiting for $what" >&2
            return 1
        fi
        sleep 0.5
    done
}

pid_alive() {  # pid_alive PIDFILE
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2> /dev/null
}

slurmd_pids() {  # the pid files of this cluster's slurmd daemons
    find "$dir/run" -maxdepth 1 -name 'slurmd*.pid' 2> /dev/null || true
}

net_names() {  # the namespace mode's names, derived from DIR: the same at start and at stop
    local h
    h=$(printf '%s' "$dir" | cksum | cut -d' ' -f1)
    tag="tst$((h % 100000))"  # interface names have at most 15 characters
    bridge="${tag}br"
    subnet=${LOCAL_CLUSTER_SUBNET:-10.$((100 + h % 100)).$((h / 100 % 250 + 1))}
    [[ $subnet =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "LOCAL_CLUSTER_SUBNET must be" \
        "the first three numbers of a /24, e.g. 10.77.3, got '$subnet'"
}

net_up() {  # the bridge, and per node a network namespace with a veth pair on it
    local i ns
    if ip link show "$bridge" > /dev/null 2>&1; then
        die "network bridge $bridge exists already (a cluster started from $dir and not" \
            "stopped? run: $0 stop $dir)"
    fi
    ip link add "$bridge" type bridge
    ip addr add "$subnet.1/24" dev "$bridge"
    ip link set "$bridge" up
    for i in $(seq "$nodes"); do
        ns="${tag}n$i"
        ip netns add "$ns"
        ip link add "${tag}v$i" type veth peer name eth0 netns "$ns"
        ip link set "${tag}v$i" master "$bridge" up
        ip -n "$ns" addr add "$subnet.$((10 + i))/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
    done
}

net_down() {  # whatever of net_up exists, and any process left in the namespaces
    local ns pids link
    for ns in $(ip netns list 2> /dev/null | awk '{print $1}' | grep -E "^${tag}n[0-9]+$" || true); do
        pids=$(ip netns pids "$ns" 2> /dev/null || true)
        # shellcheck disable=SC2086  # one pid per word
        if [[ -n $pids ]]; then kill -KILL $pids 2> /dev/null || true; fi
        ip netns del "$ns" 2> /dev/null || true
    done
    for link in $(ip -o link show 2> /dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' |
        grep -E "^${tag}v[0-9]+$" || true); do  # netns deletion frees its veths lazily
        ip link del "$link" 2> /dev/null || true
    done
    ip link del "$bridge" 2> /dev/null || true
}

start() {
    need munged mungekey slurmctld slurmd scontrol sinfo
    ((nodes == 0)) || need ip unshare nsenter
    [[ $(id -u) -eq 0 ]] || die "start needs root (slurmd runs each job as its submitting user)"
    if pid_alive "$dir/run/slurmctld.pid"; then
        die "a cluster is already running in $dir (stop it with: $0 stop $dir)"
    fi
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    export SLURM_CONF="$dir/slurm.conf"
    mkdir -p "$dir"/{munge,state,spool,log,run}
    rm -f "$dir"/run/slurmd*.pid "$dir/hosts"
    chmod 0700 "$dir/munge"

    # munge: a fresh key for this cluster; munged runs as root here, hence --force.
    if [[ ! -s $dir/munge/munge.key ]]; then
        mungekey --create --keyfile="$dir/munge/munge.key" --force
    fi
    chmod 0400 "$dir/munge/munge.key"
    munged --force --socket="$dir/munge/munge.socket.2" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" \
        --seed-file="$dir/munge/munged.seed"
    wait_for 10 munged test -S "$dir/munge/munge.socket.2" || { tail -20 "$dir/log/munged.log" >&2; exit 1; }

    local host cpus mem_mb ctld_port slurmd_port killwait cred_expire name i node ns
    host=$(hostname -s)
    name=${LOCAL_CLUSTER_NAME:-tstlocal}
    cpus=${LOCAL_CLUSTER_CPUS:-$(nproc)}
    # 90% of physical memory, in MB (slurmd refuses to register a node with more than it has).
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    ctld_port=${SLURMCTLD_PORT:-6817}
    slurmd_port=${SLURMD_PORT:-6818}
    killwait=${LOCAL_CLUSTER_KILLWAIT:-90}
    cred_expire=${LOCAL_CLUSTER_REQUEUE_DELAY:-10}
    local ctld_host=$host spool=$dir/spool slurmd_pid=$dir/run/slurmd.pid
    local slurmd_log=$dir/log/slurmd.log what="a single-node test cluster on $host"
    if ((nodes)); then
        net_names
        ctld_host="$host($subnet.1)"
        spool=$dir/spool/%n slurmd_pid=$dir/run/slurmd-%n.pid slurmd_log=$dir/log/slurmd-%n.log
        what="a test cluster of $nodes nodes in network namespaces on $host (bridge $bridge)"
    fi
    cat > "$SLURM_CONF" << EOF
# Generated by scripts/slurm/local-cluster.sh: $what.
ClusterName=$name
SlurmctldHost=$ctld_host
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire is also the delay before a requeued job may start again (default 120 s).
AuthInfo=socket=$dir/munge/munge.socket.2,cred_expire=$cred_expire
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$slurmd_pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$slurmd_log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroup hierarchy to rely on in a container: track job processes through /proc.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
# Schedule every 2 s (default 60 s) so that requeued and dependent jobs start promptly.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# SIGTERM -> SIGKILL grace when a job ends (time limit, scancel, requeue): a checkpoint fits.
KillWait=$killwait
# Jobs may be requeued (sbatch --requeue, scontrol requeue); completed jobs stay visible 10 min.
JobRequeue=1
MinJobAge=600
ReturnToService=2
SlurmctldTimeout=60
SlurmdTimeout=300
InactiveLimit=0
# The node as configured, not as probed: LOCAL_CLUSTER_CPUS may exceed the machine's cores (to
# accept jobs written for real nodes, e.g. --cpus-per-task=32).
SlurmdParameters=config_overrides
EOF
    local node_names=()
    if ((nodes == 0)); then
        node_names=("$host")
        echo "NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN" \
            >> "$SLURM_CONF"
    else
        printf '127.0.0.1 localhost\n%s.1 %s\n' "$subnet" "$host" > "$dir/hosts"
        for i in $(seq "$nodes"); do
            node_names+=("${name}n$i")
            echo "NodeName=${name}n$i NodeAddr=$subnet.$((10 + i)) NodeHostname=${name}n$i" \
                "CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN" >> "$SLURM_CONF"
            echo "$subnet.$((10 + i)) ${name}n$i" >> "$dir/hosts"
            mkdir -p "$dir/spool/${name}n$i"
        done
    fi
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${node_names[*]}") Default=YES" \
        "MaxTime=INFINITE State=UP OverSubscribe=NO" >> "$SLURM_CONF"

    if ((nodes)); then
        net_down  # what an earlier start that failed half-way left
        net_up
    fi
    # -i: ignore state from an earlier cluster in this directory (no stale jobs come back).
    slurmctld -f "$SLURM_CONF" -i
    wait_for 30 slurmctld scontrol ping || { tail -20 "$dir/log/slurmctld.log" >&2; exit 1; }
    if ((nodes == 0)); then
        slurmd -f "$SLURM_CONF" -N "$host"
    else
        for i in $(seq "$nodes"); do
            node=${name}n$i ns=${tag}n$i
            # Its hostname, and the cluster's names as /etc/hosts, in namespaces of its own;
            # slurmd daemonizes inside them and every job step it starts inherits them.
            # shellcheck disable=SC2016  # expanded by the inner shell
            nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private bash -c \
                'hostname "$1" && mount --bind "$2" /etc/hosts && exec slurmd -f "$3" -N "$1"' \
                _ "$node" "$dir/hosts" "$SLURM_CONF"
        done
    fi
    all_idle() {
        local n
        for n in "${node_names[@]}"; do sinfo -h -N -n "$n" -o %t | grep -qx idle || return 1; done
    }
    wait_for 60 "slurmd (nodes ${node_names[*]} idle)" all_idle || {
        tail -n 20 "$dir"/log/slurmd*.log "$dir/log/slurmctld.log" >&2
        exit 1
    }
    if ((nodes)); then
        echo "Slurm cluster up in $dir: nodes ${node_names[*]} at $subnet.11-$((10 + nodes))" \
            "(bridge $bridge, controller $subnet.1), $cpus CPUs and ${mem_mb} MB each," \
            "KillWait ${killwait}s"
    else
        echo "Slurm cluster up in $dir: node $host, $cpus CPUs, ${mem_mb} MB, KillWait ${killwait}s"
    fi
    echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
    [[ -d $dir ]] || die "no cluster directory $dir"
    if [[ -f $SLURM_CONF ]] && pid_alive "$dir/run/slurmctld.pid"; then
        # Kill what still runs (all steps and batch shells at once, no grace), then wait until
        # slurmd has no step left: slurmstepd processes outlive slurmd otherwise.
        local jobs
        jobs=$(squeue -h -o %i 2> /dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086  # one job id per word
            scancel --full --signal=KILL $jobs 2> /dev/null || true
            # shellcheck disable=SC2086
            scancel $jobs 2> /dev/null || true
        fi
        # slurmstepd listens on a socket in the spool directory while its step lives.
        no_steps() { [[ -z $(find "$dir/spool" -maxdepth 2 -type s) ]]; }
        wait_for 30 "the job steps to end (sockets in $dir/spool)" no_steps || true
    fi
    local file pid
    for file in $(slurmd_pids) "$dir/run/slurmctld.pid" "$dir/run/munged.pid"; do
        if pid_alive "$file"; then
            pid=$(cat "$file")
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2> /dev/null || break; sleep 0.2; done
            if kill -0 "$pid" 2> /dev/null; then kill -KILL "$pid" 2> /dev/null || true; fi
        fi
    done
    if [[ -f $dir/hosts ]] && command -v ip > /dev/null 2>&1; then  # the namespace mode
        net_names
        net_down
    fi
    echo "Slurm cluster in $dir stopped"
}

status() {
    local file daemon state=0
    for file in "$dir/run/munged.pid" "$dir/run/slurmctld.pid" $(slurmd_pids); do
        daemon=$(basename "$file" .pid)
        if pid_alive "$file"; then
            echo "$daemon: running (pid $(cat "$file"))"
        else
            echo "$daemon: not running"
            state=1
        fi
    done
    [[ -n $(slurmd_pids) ]] || { echo "slurmd: not running"; state=1; }
    if ((state == 0)); then
        sinfo
        squeue
    fi
    return "$state"
}

case $action in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) usage ;;
esac
