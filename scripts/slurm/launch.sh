#!/usr/bin/env bash
# Per-node launcher: run once on every node by `srun --ntasks-per-node=1` (train.sbatch does),
# it turns the Slurm environment into a torchrun rendezvous and execs
#   torchrun ... -m megatron_tst.cli train RECIPE [key=value ...]
#
#   srun --ntasks-per-node=1 scripts/slurm/launch.sh configs/demo-cpu.yaml run_dir=runs/x
#
# Rendezvous (static, one torchrun agent per node):
#   MASTER_ADDR  first host of `scontrol show hostnames "$SLURM_JOB_NODELIST"` (or as set)
#   MASTER_PORT  20000 + SLURM_JOB_ID % 20000 (or as set)
#   node rank    SLURM_NODEID;  --nnodes  SLURM_JOB_NUM_NODES
#   processes    MEGATRON_TST_NPROC_PER_NODE, else SLURM_GPUS_ON_NODE, else the GPUs that
#                nvidia-smi lists (8 on a usual GPU node), else 1 (CPU: gloo)
# Other environment: MEGATRON_TST_PYTHON (python3), MEGATRON_TST_SHUTDOWN_TIMEOUT (seconds
# torchrun waits for the workers after forwarding a signal before it SIGKILLs them; default 240),
# MEGATRON_TST_MAX_RESTARTS (in-job restarts: how many times this node runs torchrun again after
# its workers crashed or hung, each restart resuming from the run's `latest` checkpoint; default
# 0: a crash ends the step and train.sbatch decides; see below and docs/launching.md).
# NCCL's flight recorder (TORCH_NCCL_TRACE_BUFFER_SIZE, TORCH_NCCL_DUMP_ON_TIMEOUT,
# TORCH_NCCL_DEBUG_INFO_TEMP_FILE) is not set here: the trainer sets each one that is unset, into
# <run_dir>/hang/, before its process group exists (docs/reliability.md#hangs); export your own
# to override them.
#
# Signals: torchrun forwards only the signals named in --signals-to-handle to its workers (its
# default SIGTERM,SIGINT,SIGHUP,SIGQUIT) and SIGUSR1 would kill it, so SIGUSR1 is added there.
# The trainer finishes its step, saves, writes <run_dir>/exit_status.json and exits 75; torchrun
# then exits 1, which is why train.sbatch reads exit_status.json rather than exit codes.
set -euo pipefail
# Until torchrun has installed its handlers, an early SIGUSR1 must not kill this process (an
# ignored signal stays ignored across exec; torchrun replaces it with its forwarding handler).
trap '' USR1

die() {
    echo "launch.sh: $*" >&2
    exit 2
}

[[ $# -ge 1 ]] || die "usage: launch.sh RECIPE [key=value ...] (run by srun from train.sbatch)"
recipe=$1
shift

for var in SLURM_JOB_ID SLURM_JOB_NODELIST SLURM_JOB_NUM_NODES SLURM_NODEID; do
    [[ -n ${!var:-} ]] || die "$var is not set: run this under srun inside a Slurm job " \
        "(sbatch scripts/slurm/train.sbatch ...), not directly"
done

if [[ -z ${MASTER_ADDR:-} ]]; then
    command -v scontrol > /dev/null 2>&1 || die "MASTER_ADDR is not set and scontrol is not " \
        "available here (in a container?): set MASTER_ADDR to the first node's hostname " \
        "(train.sbatch exports it)"
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

if [[ -n ${MEGATRON_TST_NPROC_PER_NODE:-} ]]; then
    nproc=$MEGATRON_TST_NPROC_PER_NODE
elif [[ -n ${SLURM_GPUS_ON_NODE:-} && ${SLURM_GPUS_ON_NODE} != 0 ]]; then
    nproc=$SLURM_GPUS_ON_NODE
elif command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L > /dev/null 2>&1; then
    nproc=$(nvidia-smi -L | grep -c '^GPU')
else
    nproc=1
fi
[[ $nproc =~ ^[1-9][0-9]*$ ]] || die "processes per node must be a positive integer, got " \
    "'$nproc' (MEGATRON_TST_NPROC_PER_NODE / SLURM_GPUS_ON_NODE)"

python=${MEGATRON_TST_PYTHON:-python3}
command -v "$python" > /dev/null 2>&1 || die "python '$python' not found on $(hostname): set " \
    "MEGATRON_TST_PYTHON to the interpreter that has megatron-tst installed"
timeout=${MEGATRON_TST_SHUTDOWN_TIMEOUT:-240}
max_restarts=${MEGATRON_TST_MAX_RESTARTS:-0}
[[ $max_restarts =~ ^(0|[1-9][0-9]{0,2})$ ]] || die "MEGATRON_TST_MAX_RESTARTS must be a" \
    "non-negative integer below 1000 (in-job restarts after a worker crash), got '$max_restarts'"

# Which signal options this torch's torchrun knows (read from its source: no torch import).
run_py=$("$python" -c 'import importlib.util, os, sys
spec = importlib.util.find_spec("torch")
if spec is None:
    sys.exit("torch is not installed for " + sys.executable)
print(os.path.join(spec.submodule_search_locations[0], "distributed", "run.py"))') ||
    die "cannot locate torch for $python; set MEGATRON_TST_PYTHON"
signal_opts=()
if grep -q -- '--signals-to-handle' "$run_py"; then
    signal_opts+=(--signals-to-handle "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
else
    # An older torchrun cannot forward SIGUSR1; it keeps ignoring it (trap above) and only the
    # SIGTERM that Slurm sends every process at the time limit reaches the workers.
    echo "launch.sh: warning: this torchrun has no --signals-to-handle, so SIGUSR1 (the" \
        "time-limit warning) cannot reach the workers; upgrade torch or rely on SIGTERM" >&2
fi
if grep -q -- '--shutdown-timeout' "$run_py"; then
    signal_opts+=(--shutdown-timeout "$timeout")
fi
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$timeout

echo "launch.sh: node $SLURM_NODEID/$SLURM_JOB_NUM_NODES on $(hostname): $nproc processes," \
    "master $MASTER_ADDR:$MASTER_PORT, job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0})," \
    "up to $max_restarts in-job restart(s)"
torchrun=("$python" -m torch.distributed.run
    --nnodes "$SLURM_JOB_NUM_NODES" --node-rank "$SLURM_NODEID" --nproc-per-node "$nproc"
    --master-addr "$MASTER_ADDR")
train=(--max-restarts 0 "${signal_opts[@]}" -m megatron_tst.cli train "$recipe" "$@")
if ((max_restarts == 0)); then
    exec "${torchrun[@]}" --master-port "$MASTER_PORT" "${train[@]}"
fi

# In-job restarts. Not torchrun's own --max-restarts: its restarted workers share the agent's
# rendezvous store with the killed ones and read their stale keys (the process groups fail to
# connect; pytorch/pytorch#135712), and it restarts after every non-zero exit, deliberate stops
# included (exit 75 at training.time_limit_minutes, 3 on a non-finite loss, 2 on a bad recipe).
# Instead this shell runs torchrun again, each time with a fresh agent on MASTER_PORT + attempt
# (every node counts its attempts alike: each crash ends every node's workers once), and only
# when exit_status.json says the workers crashed (`running`) or hung (`failed`, reason hang).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
run_dir=$("$python" "$here/runinfo.py" run-dir "$recipe" "$@") ||
    die "cannot resolve the run directory of $recipe (needed for MEGATRON_TST_MAX_RESTARTS)"
child=""
stopping=""
# shellcheck disable=SC2317  # called from the traps below
forward() {  # a signal ends the restarts; torchrun passes it on to its workers
    stopping=$1
    if [[ -n $child ]]; then kill -s "$1" "$child" 2> /dev/null || true; fi
}
for sig in TERM INT HUP QUIT USR1; do
    # shellcheck disable=SC2064  # $sig now, on purpose
    trap "forward $sig" "$sig"
done
attempt=0
while :; do
    trap '' USR1  # torchrun starts with SIGUSR1 ignored until it installs its handler
    "${torchrun[@]}" --master-port "$((MASTER_PORT + attempt))" "${train[@]}" &
    child=$!
    trap 'forward USR1' USR1
    rc=0
    while kill -0 "$child" 2> /dev/null; do  # a trapped signal interrupts `wait`: wait again
        wait "$child" || true
    done
    wait "$child" || rc=$?
    child=""
    ((rc != 0)) || exit 0
    if [[ -n $stopping ]]; then
        echo "launch.sh: node $SLURM_NODEID: torchrun exited $rc after SIG$stopping: no restart"
        exit "$rc"
    fi
    info=$("$python" "$here/runinfo.py" exit-status "$run_dir" 2> /dev/null) || info=missing
    read -r status step _ _ _ reason <<< "$info"
    if [[ $status != running && ! ($status == failed && $reason == hang) ]]; then
        echo "launch.sh: node $SLURM_NODEID: torchrun exited $rc, exit_status.json: $status" \
            "(reason ${reason:--}): not a crash, no restart"
        exit "$rc"
    fi
    what="crashed"
    [[ $status == running ]] || what="hung (hang watchdog)"
    if ((attempt >= max_restarts)); then
        echo "launch.sh: node $SLURM_NODEID: training $what (torchrun exit $rc, started at step" \
            "$step); the $max_restarts in-job restart(s) of MEGATRON_TST_MAX_RESTARTS are used" \
            "up: giving up"
        exit "$rc"
    fi
    attempt=$((attempt + 1))
    echo "launch.sh: node $SLURM_NODEID: training $what (torchrun exit $rc, started at step" \
        "$step): in-job restart $attempt of $max_restarts, resuming from the latest checkpoint" \
        "(master port $((MASTER_PORT + attempt)))"
    sleep 2
    if [[ -n $stopping ]]; then
        echo "launch.sh: node $SLURM_NODEID: SIG$stopping before the restart: no restart"
        exit "$rc"
    fi
done
