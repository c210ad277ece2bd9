#!/usr/bin/env bash
# Tokenize a corpus on many nodes: a Slurm job array of `megatron-tst preprocess --output-dir`
# tasks (task I of K takes sources I, I+K, ...), then a merge job that checks every shard is done
# and writes DIR/manifest.json (and the held-out set) once the array has succeeded.
#
#   scripts/slurm/preprocess.sh [OPTIONS] [SBATCH_OPTIONS] -- PREPROCESS_ARGS
#
#   scripts/slurm/preprocess.sh --tasks=16 --time=04:00:00 --cpus-per-task=32 -- \
#       --input 'dclm/**/*.jsonl.zst' --hf-tokenizer tokenizers/llama3/tokenizer.json \
#       --output-dir data/dclm --valid-fraction 0.0005 --workers 32
#
# Options:
#   --tasks=K      array tasks (default 8); each runs on one node with --workers processes
#   --dry-run      print the sbatch commands, submit nothing
#   -h, --help
# Any other option before `--` goes to sbatch for both jobs (write --opt=value). PREPROCESS_ARGS
# are `megatron-tst preprocess` arguments with --output-dir (docs/data.md); quote globs so that
# the tool expands them. Each task reads SLURM_ARRAY_TASK_COUNT / SLURM_ARRAY_TASK_ID itself.
# Re-submitting the same command resumes: finished shards are skipped. Logs go to
# logs/<job name>-<job id>_<task>.out. Prints the two job ids.
# Environment: MEGATRON_TST_PYTHON (python with megatron-tst, default python3).
#
# Inside a job (SLURM_JOB_ID set and "--run" first) this script runs one task: sbatch calls it so.
set -euo pipefail

die() {
    echo "preprocess.sh: error: $*" >&2
    exit 2
}

python=${MEGATRON_TST_PYTHON:-python3}
if [[ ${1:-} == --run ]]; then  # one array task or the merge, inside the job
    shift
    [[ -n ${SLURM_JOB_ID:-} ]] || die "--run is for the jobs this script submits"
    echo "preprocess.sh: $(date +%T) job ${SLURM_JOB_ID} task ${SLURM_ARRAY_TASK_ID:-merge} on $(hostname)"
    exec "$python" -m megatron_tst.cli preprocess "$@"
fi

tasks=8
dry_run=0
sbatch_opts=()
while [[ $# -gt 0 ]]; do
    case $1 in
        -h | --help)
            sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        --tasks=*) tasks=${1#--tasks=} ;;
        --dry-run) dry_run=1 ;;
        --) shift; break ;;
        -*) sbatch_opts+=("$1") ;;
        *) die "'$1': preprocess arguments go after --; usage: preprocess.sh [OPTIONS] [SBATCH_OPTIONS] -- PREPROCESS_ARGS (--help)" ;;
    esac
    shift
done
[[ $tasks =~ ^[1-9][0-9]*$ ]] || die "--tasks must be a positive integer, got '$tasks'"
[[ $# -ge 1 ]] || die "missing the preprocess arguments after --"
has_output_dir=0
for arg in "$@"; do
    case $arg in
        --output-dir | --output-dir=*) has_output_dir=1 ;;
        --num-shards* | --shard-index* | --merge) die "'$arg' is set by this script; drop it" ;;
    esac
done
((has_output_dir)) || die "the preprocess arguments need --output-dir DIR (one shard per source, a manifest)"
((dry_run)) || command -v sbatch > /dev/null 2>&1 || die "sbatch not found: run this on a Slurm login node"

self=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
submit() {  # submit [sbatch options ...] -- [preprocess args ...]: prints the job id
    local opts=()
    while [[ $1 != -- ]]; do opts+=("$1"); shift; done
    shift
    local cmd=(sbatch --parsable --job-name=preprocess --output=logs/%x-%A_%a.out
        "${sbatch_opts[@]}" "${opts[@]}" "$self" --run "$@")
    if ((dry_run)); then
        printf '%q ' "${cmd[@]}" >&2
        echo >&2
        echo "DRYRUN"
    else
        "${cmd[@]}" | cut -d';' -f1
    fi
}

((dry_run)) || mkdir -p logs
array=$(submit --array="0-$((tasks - 1))" -- "$@")
merge=$(submit --output=logs/%x-%j.out --dependency="afterok:$array" --kill-on-invalid-dep=yes \
    -- "$@" --merge)
echo "submitted preprocess: array job $array ($tasks tasks), merge job $merge after it" >&2
echo "$array $merge"
