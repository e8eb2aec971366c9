#!/usr/bin/env bash
# Run the libFuzzer harnesses of a build made with -Dfuzz=enabled:
#   fuzz/run.sh BUILD [SECONDS [TARGET...]]
# Each target runs SECONDS (default 20) on its corpus BUILD/fuzz-corpus/T,
# seeded first from ../shared and the checkout by qkd-fuzz-seeds (never
# committed); crashes go to BUILD/fuzz-findings/T/. Extra libFuzzer options
# come from FUZZ_ARGS (e.g. FUZZ_ARGS=-jobs=2). Prints one line per target
# and a total; exits 1 if any target found a crash.
set -uo pipefail
cd "$(dirname "$0")/.."

build=${1:?usage: fuzz/run.sh BUILD [SECONDS [TARGET...]]}
secs=${2:-20}
shift $(( $# < 2 ? $# : 2 ))
shared=${QKD_SHARED:-../shared}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(llama2c gguf hf tokenizer checkpoint optim_state tokfile eval)

corpus=$build/fuzz-corpus
findings=$build/fuzz-findings
"$build/fuzz/qkd-fuzz-seeds" "$corpus" "$shared" "$PWD" >/dev/null || exit 1

# Leaks are checked per input by the targets' counting allocator, and by
# LeakSanitizer at exit; a UBSan report is a crash.
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
total=0
crashed=0
for t in "${targets[@]}"; do
    mkdir -p "$findings/$t"
    log=$findings/$t.log
    # -max_len keeps mutations small (the shared models are ~1 MB seeds);
    # -timeout flags a single input running over 10 s as a hang.
    # shellcheck disable=SC2086
    "$build/fuzz/qkd-fuzz-$t" "$corpus/$t" -max_total_time="$secs" -max_len=65536 \
        -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$findings/$t/" ${FUZZ_ARGS:-} >"$log" 2>&1
    rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    found=$(find "$findings/$t" -type f | wc -l)
    echo "fuzz $t: ${execs:-0} executions, $found findings (exit $rc)"
    total=$(( total + ${execs:-0} ))
    if [ "$rc" -ne 0 ] || [ "$found" -ne 0 ]; then
        crashed=1
        tail -n 40 "$log"
    fi
done
echo "fuzz total: $total executions over ${#targets[@]} targets"
exit $crashed
