#!/usr/bin/env bash
# End-to-end check of the SLURM profile against a live SLURM (start it with
# tests/slurm/start_slurm.sh first):
#   1. sbatch --wrap hostname runs and completes; srun hostname works.
#   2. A toy 3-job chain (written to a temp dir under /tmp, not the repo) runs
#      with `snakemake --profile <repo>/slurm`; every job must have gone
#      through sbatch (SLURM job id in the outputs, in snakemake's log and in
#      .snakemake/slurm_logs/). Prints the wall time.
#   3. With --scancel: a job cancelled by scancel mid-run makes snakemake
#      report status CANCELLED and fail; rerunning the same command redoes
#      only that job (and what depends on it).
#
#   tests/slurm/smoke_test.sh [--scancel] [--keep]
#
# SNAKEMAKE: the snakemake to use (default: <repo>/.venv/bin/snakemake, else
# the one on PATH). Ends with "N passed, N failed".
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PROFILE=$REPO/slurm
WITH_SCANCEL=0 KEEP=0
for arg in "$@"; do
    case $arg in
        --scancel) WITH_SCANCEL=1 ;;
        --keep) KEEP=1 ;;
        *) echo "usage: $0 [--scancel] [--keep]" >&2; exit 2 ;;
    esac
done
if [[ -z ${SNAKEMAKE:-} ]]; then
    if [[ -x $REPO/.venv/bin/snakemake ]]; then SNAKEMAKE=$REPO/.venv/bin/snakemake
    else SNAKEMAKE=$(command -v snakemake || true); fi
fi
[[ -n $SNAKEMAKE ]] || { echo "smoke_test.sh: snakemake not found" >&2; exit 1; }
# The jobs re-run snakemake with the same interpreter: put it on PATH too.
SNAKEMAKE_BIN=$(dirname "$SNAKEMAKE")
export PATH="$SNAKEMAKE_BIN:$PATH"

PASSED=0 FAILED=0
ok() { echo "PASS: $*"; PASSED=$((PASSED + 1)); }
bad() { echo "FAIL: $*"; FAILED=$((FAILED + 1)); }
check() { local what=$1; shift; if "$@"; then ok "$what"; else bad "$what"; fi; }

if ! [[ $(sinfo -h -o '%T' 2>/dev/null || true) =~ idle|mixed|allocated ]]; then
    echo "smoke_test.sh: no usable SLURM node; run tests/slurm/start_slurm.sh" >&2
    sinfo >&2 || true
    exit 1
fi

WORK=$(mktemp -d /tmp/gtmoe-slurm-smoke.XXXXXX)
cleanup() { if [[ $KEEP == 1 ]]; then echo "kept $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT

# wait_job ID TIMEOUT -> prints the final state (squeue keeps finished jobs
# for MinJobAge seconds; there is no sacct without accounting).
wait_job() {
    local id=$1 timeout=$2 state='' t0=$SECONDS
    while (( SECONDS - t0 < timeout )); do
        state=$(squeue -h -j "$id" --states=all -o '%T' 2>/dev/null || true)
        case $state in COMPLETED|FAILED|CANCELLED|TIMEOUT|OUT_OF_MEMORY|NODE_FAIL) break ;; esac
        sleep 0.5
    done
    echo "$state"
}

# ------------------------------------------------------ 1. plain SLURM ---
id=$(sbatch --parsable -o "$WORK/sbatch-%j.out" -t 1 --mem 100 --wrap 'hostname')
state=$(wait_job "$id" 60)
check "sbatch --wrap hostname: job $id $state" [ "$state" = COMPLETED ]
check "sbatch output is this host" grep -qx "$(hostname)" "$WORK/sbatch-$id.out"
out=$(srun -t 1 --mem 100 hostname 2>&1 || true)
check "srun hostname -> '$out'" [ "$out" = "$(hostname)" ]

# ------------------------------------------------- 2. toy via profile ---
TOY=$WORK/toy
mkdir -p "$TOY"
cat > "$TOY/Snakefile" <<'EOF'
rule all:
    input: "c.txt"

rule a:
    output: "a.txt"
    log: "logs/a.log"
    threads: 1
    resources: runtime=5, mem_mb=500
    shell: "(echo a job=$SLURM_JOB_ID cpus=$SLURM_CPUS_PER_TASK > {output}) 2> {log}"

rule b:
    input: "a.txt"
    output: "b.txt"
    shell: "cat {input} > {output}; echo b job=$SLURM_JOB_ID >> {output}"

rule c:
    input: "b.txt"
    output: "c.txt"
    shell: "cat {input} > {output}; echo c job=$SLURM_JOB_ID >> {output}"
EOF
t0=$(date +%s.%N)
rc=0
"$SNAKEMAKE" --profile "$PROFILE" --slurm-keep-successful-logs \
    --snakefile "$TOY/Snakefile" --directory "$TOY" > "$WORK/toy.log" 2>&1 || rc=$?
wall=$(echo "$(date +%s.%N) - $t0" | bc)
check "toy workflow (3 SLURM jobs) exit 0 in ${wall}s" [ "$rc" = 0 ]
[[ $rc == 0 ]] || tail -n 40 "$WORK/toy.log"
check "each toy job ran under a SLURM job id" \
    [ "$(grep -cE '^[abc] job=[0-9]+' "$TOY/c.txt" 2>/dev/null)" = 3 ]
check "snakemake log names 3 SLURM job ids" \
    [ "$(grep -cE 'has been submitted with SLURM jobid [0-9]+' "$WORK/toy.log")" = 3 ]
check ".snakemake/slurm_logs has 3 <jobid>.log files" \
    [ "$(find "$TOY/.snakemake/slurm_logs" -name '[0-9]*.log' | wc -l)" = 3 ]
check "rule a's SLURM job had 500M, 5 min" \
    bash -c "id=\$(sed -n 's/^a job=\([0-9]*\).*/\1/p' '$TOY/c.txt'); \
             scontrol show job \$id | grep -q 'TimeLimit=00:05:00' && \
             scontrol show job \$id | grep -q 'mem=500M'"
grep -E 'has been submitted with SLURM jobid' "$WORK/toy.log" | sed 's/^/    /'

# --------------------------------------------------- 3. scancel + rerun ---
if [[ $WITH_SCANCEL == 1 ]]; then
    CAN=$WORK/cancel
    mkdir -p "$CAN"
    cat > "$CAN/Snakefile" <<'EOF'
rule all:
    input: "final.txt"

rule fast:
    output: "fast.txt"
    resources: runtime=5, mem_mb=500
    shell: "echo fast job=$SLURM_JOB_ID > {output}"

rule slow:
    output: "slow.txt"
    resources: runtime=5, mem_mb=500
    shell: "echo started > {output}; sleep 60; echo slow job=$SLURM_JOB_ID > {output}"

rule final:
    input: "fast.txt", "slow.txt"
    output: "final.txt"
    shell: "cat {input} > {output}"
EOF
    # --retries 0: the profile's retries: 1 would resubmit the cancelled job.
    run_can() {
        "$SNAKEMAKE" --profile "$PROFILE" --retries 0 --slurm-keep-successful-logs \
            --snakefile "$CAN/Snakefile" --directory "$CAN"
    }
    rc=0
    run_can > "$WORK/cancel1.log" 2>&1 &
    smk=$!
    slow_id=
    for _ in $(seq 1 120); do
        slow_id=$(squeue -h -t RUNNING -o '%i %k' | awk '$2 == "rule_slow" {print $1}' | head -n 1)
        [[ -n $slow_id && -s $CAN/slow.txt ]] && break
        sleep 1
    done
    if [[ -n $slow_id ]]; then scancel "$slow_id"; fi
    wait "$smk" || rc=$?
    check "scancel'ed run exits non-zero (rc=$rc)" [ "$rc" != 0 ]
    check "snakemake reports SLURM status CANCELLED for job $slow_id" \
        grep -q "SLURM-job '$slow_id' failed, SLURM status is: 'CANCELLED'" "$WORK/cancel1.log"
    check "fast job finished anyway" [ -s "$CAN/fast.txt" ]
    fast_before=$(cat "$CAN/fast.txt" 2>/dev/null || true)
    run_can > "$WORK/cancel2.log" 2>&1 && rc=0 || rc=$?
    check "rerun exits 0" [ "$rc" = 0 ]
    check "rerun submitted only slow + final" \
        [ "$(grep -oE 'Job [0-9]+ has been submitted' "$WORK/cancel2.log" | wc -l)" = 2 ]
    check "rerun did not redo fast" [ "$(cat "$CAN/fast.txt")" = "$fast_before" ]
    grep -E "^(rule|localrule) " "$WORK/cancel2.log" | sed 's/^/    rerun: /'
fi

echo "$PASSED passed, $FAILED failed"
[[ $FAILED == 0 ]]
