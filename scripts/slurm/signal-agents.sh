#!/usr/bin/env bash
# Send a signal to the torchrun agents of this job only, not to every process of the step.
# train.sbatch runs it on every node as an extra step:
#   srun --overlap --ntasks-per-node=1 scripts/slurm/signal-agents.sh USR1
# On each node it lists the job's processes (`scontrol listpids`) and signals the task leaders
# (LOCALID set: the processes srun started, i.e. launch.sh exec'ed into torchrun) of the job's
# other numbered steps. torchrun forwards the signal to its workers (launch.sh passes
# --signals-to-handle ...,SIGUSR1).
#
# Why not `kill -s SIG <srun pid>`: srun forwards a signal to EVERY process of the step, and a
# SIGTERM sent to srun makes it cancel the step at once (no checkpoint). Here only the agents
# get it; torchrun passes it to each worker's process group.
set -euo pipefail

sig=${1:?usage: signal-agents.sh SIGNAL (e.g. USR1), run under srun inside the job}
: "${SLURM_JOB_ID:?signal-agents.sh runs under srun inside a Slurm job}"
own_step=${SLURM_STEP_ID:-}

# PID JOBID STEPID LOCALID GLOBALID; task leaders have a LOCALID, their descendants "-".
pids=$(scontrol listpids "$SLURM_JOB_ID" | awk -v own="$own_step" \
    'NR > 1 && $3 ~ /^[0-9]+$/ && $3 != own && $4 != "-" { print $1 }')
if [[ -z $pids ]]; then
    echo "signal-agents.sh: no training step of job $SLURM_JOB_ID on $(hostname)" >&2
    exit 1
fi
for pid in $pids; do
    kill -s "$sig" "$pid"
done
echo "signal-agents.sh: SIG$sig sent to $(echo "$pids" | wc -w) agent(s) on $(hostname)"
