#!/usr/bin/env bash
# Submit a recipe to Slurm through scripts/slurm/train.sbatch, as one job or, for a TST run, as
# two dependent jobs: phase 1 (superposition) stops at its last step with a checkpoint, phase 2
# (recovery) starts when phase 1 has succeeded and resumes from the same run directory.
#
#   scripts/slurm/submit.sh [OPTIONS] [SBATCH_OPTIONS] RECIPE [key=value ...]
#
#   scripts/slurm/submit.sh --nodes=2 --time=04:00:00 configs/270m.yaml name=s4
#   scripts/slurm/submit.sh --chain --nodes=2 --time=02:00:00 \
#       --phase2-sbatch=--nodes=4 configs/270m.yaml name=s4
#
# Options:
#   --chain               two jobs: phase 1 with training.exit_at_step=S (S = superposition
#                         steps, round(tst.ratio * training.train_steps) or
#                         tst.superposition_steps, from the resolved config), phase 2 with
#                         --dependency=afterok:<phase 1>
#   --phase1-sbatch=OPT   an sbatch option for the phase-1 job only (repeatable)
#   --phase2-sbatch=OPT   an sbatch option for the phase-2 job only (repeatable)
#   --dry-run             print the sbatch commands, submit nothing
#   -h, --help
# Any other option before RECIPE goes to sbatch for every job (write --opt=value, not --opt value).
# The run directory is resolved once here (absolute) and passed to every job as run_dir=...,
# so all jobs of a run share checkpoints, metrics.jsonl and exit_status.json. Logs go to
# logs/<job name>-<job id>.out under the current directory (created here). Prints the job ids.
# Environment: MEGATRON_TST_PYTHON (python3; only needs PyYAML here), and what train.sbatch reads
# (MEGATRON_TST_IMAGE, MEGATRON_TST_NPROC_PER_NODE, ...), exported to the jobs by sbatch.
set -euo pipefail

die() {
    echo "submit.sh: error: $*" >&2
    exit 2
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
python=${MEGATRON_TST_PYTHON:-python3}
split=0
dry_run=0
sbatch_opts=()
phase1_opts=()
phase2_opts=()
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help)
            sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        --chain) split=1 ;;
        --dry-run) dry_run=1 ;;
        --phase1-sbatch=*) phase1_opts+=("${1#--phase1-sbatch=}") ;;
        --phase2-sbatch=*) phase2_opts+=("${1#--phase2-sbatch=}") ;;
        --) shift; break ;;
        -*) sbatch_opts+=("$1") ;;
        *) break ;;
    esac
    shift
done
[[ $# -ge 1 ]] || die "missing RECIPE; usage: submit.sh [OPTIONS] [SBATCH_OPTIONS] RECIPE [key=value ...] (--help)"
recipe=$1
shift
[[ -f $recipe ]] || die "recipe $recipe not found"
for arg in "$@"; do
    [[ $arg != -* ]] || die "'$arg': sbatch options go before RECIPE"
    [[ $arg == *=* ]] || die "'$arg' is not a key=value override (sbatch options go before RECIPE)"
    if ((split)) && [[ $arg == training.exit_at_step=* ]]; then
        die "--chain sets training.exit_at_step itself; drop '$arg'"
    fi
done
((dry_run)) || command -v sbatch > /dev/null 2>&1 || die "sbatch not found: run this on a " \
    "Slurm login node (or start scripts/slurm/local-cluster.sh and export its SLURM_CONF)"

info() { "$python" "$repo/scripts/slurm/runinfo.py" "$@"; }
run_dir=$(info run-dir "$recipe" "$@")
name=$(info name "$recipe" "$@")
export MEGATRON_TST_HOME=$repo

submit() {  # submit JOB_NAME [sbatch options ...] -- [overrides ...]: prints the job id
    local job_name=$1
    shift
    local opts=()
    while [[ $1 != -- ]]; do opts+=("$1"); shift; done
    shift
    local cmd=(sbatch --parsable --job-name="$job_name" "${sbatch_opts[@]}" "${opts[@]}"
        "$repo/scripts/slurm/train.sbatch" "$recipe" "$@" "run_dir=$run_dir")
    if ((dry_run)); then
        printf '%q ' "${cmd[@]}" >&2
        echo >&2
        echo "DRYRUN-$job_name"
    else
        "${cmd[@]}" | cut -d';' -f1
    fi
}

((dry_run)) || mkdir -p logs
if ((!split)); then
    job=$(submit "$name" -- "$@")
    echo "submitted $name: job $job; run directory $run_dir; log logs/$name-$job.out" >&2
    echo "$job"
    exit 0
fi

steps=$(info phase1-steps "$recipe" "$@")
total=$(info train-steps "$recipe" "$@")
job1=$(submit "$name-p1" "${phase1_opts[@]}" -- "$@" "training.exit_at_step=$steps")
job2=$(submit "$name-p2" --dependency="afterok:$job1" --kill-on-invalid-dep=yes \
    "${phase2_opts[@]}" -- "$@")
echo "submitted $name: phase 1 (superposition, steps 1-$steps) job $job1, phase 2 (recovery," \
    "steps $((steps + 1))-$total) job $job2 after it; run directory $run_dir" >&2
echo "$job1 $job2"
