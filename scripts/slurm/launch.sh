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
# torchrun waits for the workers after forwarding a signal before it SIGKILLs them; default 240).
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
    "master $MASTER_ADDR:$MASTER_PORT, job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0})"
exec "$python" -m torch.distributed.run \
    --nnodes "$SLURM_JOB_NUM_NODES" --node-rank "$SLURM_NODEID" --nproc-per-node "$nproc" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" --max-restarts 0 \
    "${signal_opts[@]}" \
    -m megatron_tst.cli train "$recipe" "$@"
