#!/usr/bin/env bash
# Preprocess a large corpus in parallel as a SLURM job array, then merge the parts into one shard set:
#
#   INPUTS='/data/corpus/*.jsonl.zst' OUTPUT=data/shards/corpus sbatch --array=0-15 slurm/preprocess.sh
#
# Array task i of N takes the i-th contiguous slice of the sorted input files and writes its own
# shard set to $OUTPUT.parts/part-NNNNN. The first task submits a merge job that starts once every
# task succeeded (afterok) and writes one manifest over all parts into $OUTPUT; because slices are
# contiguous and merged in order, $OUTPUT streams the same documents, in the same order, as a
# single `synergy-preprocess` over all the inputs. (Exception: --dedup only removes duplicates
# within a slice.) Environment variables (sbatch exports your environment):
#   INPUTS            files and/or globs, space-separated (quote globs so the shell keeps them)
#   INPUT_LIST        or: a text file with one input path per line
#   OUTPUT            the final merged shard-set directory (required; must not exist yet); with
#                     --valid-fraction it gets train/ and valid/, as from one synergy-preprocess
#   PARTS_DIR         where the per-task shard sets go (default $OUTPUT.parts; delete after merging)
#   PREPROCESS_ARGS   extra synergy-preprocess options, e.g. "--shard-size 64MiB --valid-fraction 0.001"
# Arguments after the script name are passed to synergy-preprocess too.
#
#SBATCH --job-name=synergy-preprocess
#SBATCH --array=0-7
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --time=12:00:00
#SBATCH --output=%x-%A_%a.out
##SBATCH --partition=YOUR_PARTITION
##SBATCH --account=YOUR_ACCOUNT
set -euo pipefail

die() { echo "preprocess.sh: error: $*" >&2; exit 2; }

[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a SLURM job; submit it with: sbatch --array=0-N slurm/preprocess.sh"
cd "${SLURM_SUBMIT_DIR:-.}"
[ -n "${OUTPUT:-}" ] || die "OUTPUT is not set; export OUTPUT=<directory for the merged shard set>"
OUTPUT="$(realpath -m "$OUTPUT")"
PARTS_DIR="$(realpath -m "${PARTS_DIR:-$OUTPUT.parts}")"

# ---- the input files, in a fixed order --------------------------------------------------------
FILES=()
if [ -n "${INPUT_LIST:-}" ]; then
    [ -f "$INPUT_LIST" ] || die "INPUT_LIST=$INPUT_LIST does not exist"
    while IFS= read -r line; do [ -n "$line" ] && FILES+=("$line"); done < "$INPUT_LIST"
elif [ -n "${INPUTS:-}" ]; then
    # C collation: the same order as the data pipeline's own (Python-sorted) glob expansion.
    shopt -s nullglob
    for pattern in $INPUTS; do
        matches=()
        while IFS= read -r -d '' f; do matches+=("$f"); done < <(
            LC_ALL=C compgen -G "$pattern" | LC_ALL=C sort | tr '\n' '\0')
        [ ${#matches[@]} -gt 0 ] || die "INPUTS pattern '$pattern' matches no files"
        FILES+=("${matches[@]}")
    done
else
    die "no inputs: export INPUTS='<files or globs>' or INPUT_LIST=<file with one path per line>"
fi
for f in "${FILES[@]}"; do [ -f "$f" ] || die "input file $f does not exist"; done

# ---- this task's slice: contiguous, so merging parts in task order keeps the input order ------
# The merge job is not an array task; the first task passes it the count.
TASK_COUNT="${PREPROCESS_TASK_COUNT:-${SLURM_ARRAY_TASK_COUNT:-1}}"
TASK_INDEX=$(( ${SLURM_ARRAY_TASK_ID:-0} - ${SLURM_ARRAY_TASK_MIN:-0} ))
slice_start() { echo $(( $1 * ${#FILES[@]} / TASK_COUNT )); }
part_dir() { printf '%s/part-%05d' "$PARTS_DIR" "$1"; }

if [ "${PREPROCESS_STEP:-slice}" = merge ]; then
    # ---- merge step: one manifest over every non-empty part, with the layout one process writes
    # (OUTPUT/, or OUTPUT/train + OUTPUT/valid with --valid-fraction) -----------------------------
    if [ -f "$OUTPUT/manifest.json" ] || [ -f "$OUTPUT/train/manifest.json" ]; then
        echo "preprocess.sh: $OUTPUT already has a manifest; nothing to merge"
        exit 0
    fi
    PARTS=()
    for (( i = 0; i < TASK_COUNT; i++ )); do
        [ "$(slice_start "$i")" -lt "$(slice_start $(( i + 1 )))" ] && PARTS+=("$(part_dir "$i")")
    done
    if [ -d "${PARTS[0]}/train" ]; then
        for split in train valid; do
            synergy-data merge --output "$OUTPUT/$split" "${PARTS[@]/%//$split}"
            synergy-data verify "$OUTPUT/$split"
        done
    else
        synergy-data merge --output "$OUTPUT" "${PARTS[@]}"
        synergy-data verify "$OUTPUT"
    fi
    echo "preprocess.sh: merged ${#PARTS[@]} part(s) into $OUTPUT (the parts in $PARTS_DIR may be deleted)"
    exit 0
fi

{ [ -e "$OUTPUT/manifest.json" ] || [ -e "$OUTPUT/train/manifest.json" ]; } \
    && die "OUTPUT=$OUTPUT already holds a shard set; choose a new OUTPUT"
mkdir -p "$PARTS_DIR"

# The first task submits the merge job, which runs only if every array task succeeds. It is an
# array of one task, since otherwise the #SBATCH --array line above would apply to it too.
if [ "$TASK_INDEX" -eq 0 ]; then
    ARRAY_JOB="${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}"
    MERGE_JOB="$(sbatch --parsable --array=0 --job-name="${SLURM_JOB_NAME:-synergy-preprocess}-merge" \
        --dependency="afterok:$ARRAY_JOB" --kill-on-invalid-dep=yes --ntasks=1 --cpus-per-task=1 \
        --output="$PARTS_DIR/merge-%j.out" \
        --export="ALL,PREPROCESS_STEP=merge,OUTPUT=$OUTPUT,PARTS_DIR=$PARTS_DIR,PREPROCESS_TASK_COUNT=$TASK_COUNT" \
        "$0")"
    echo "$MERGE_JOB" > "$PARTS_DIR/merge-job-id"
    echo "preprocess.sh: merge job $MERGE_JOB will run after array job $ARRAY_JOB"
fi

START="$(slice_start "$TASK_INDEX")"
END="$(slice_start $(( TASK_INDEX + 1 )))"
if [ "$START" -ge "$END" ]; then
    echo "preprocess.sh: task $TASK_INDEX of $TASK_COUNT has no input files (more tasks than files)"
    exit 0
fi
EXTRA=()
[ -n "${PREPROCESS_ARGS:-}" ] && read -r -a EXTRA <<<"$PREPROCESS_ARGS"
echo "preprocess.sh: task $TASK_INDEX of $TASK_COUNT: files $START..$(( END - 1 )) of ${#FILES[@]} -> $(part_dir "$TASK_INDEX")"
# synergy-preprocess is resumable: a requeued or re-run task only writes the shards it lacks.
synergy-preprocess --workers "${SLURM_CPUS_PER_TASK:-1}" --quiet "${EXTRA[@]}" "$@" \
    --output "$(part_dir "$TASK_INDEX")" "${FILES[@]:$START:$(( END - START ))}"
