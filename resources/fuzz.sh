#!/usr/bin/env bash
# `make fuzz`: run fuzz campaigns (fuzz/README.md) and print one table of what they did.
#
#   FUZZ_TARGETS   the targets (default: every target in fuzz/fuzz_targets/)
#   FUZZ_RUNS      inputs per target (default 10000000)
#   FUZZ_PARALLEL  campaigns at once (default 1; one core each)
#   FUZZ_JOBS      worker processes per campaign (default 1), sharing its corpus, the inputs
#                  split evenly among them (libFuzzer's -jobs; logs in fuzz/logs/TARGET.jobs/)
#   FUZZ_SAN       the sanitizer: none (default: debug assertions and overflow checks on, see
#                  fuzz/README.md for why) or address
#
# Installs the nightly toolchain and cargo-fuzz when missing. Each campaign starts from the
# committed seed corpus plus what earlier campaigns kept in fuzz/corpus-work/TARGET (ignored by
# git); its log goes to fuzz/logs/TARGET.log (ignored). Exits 1 if any campaign found a crash
# (the input is in fuzz/artifacts/TARGET/); slow-unit reports are listed, not failures.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

runs=${FUZZ_RUNS:-10000000}
parallel=${FUZZ_PARALLEL:-1}
jobs=${FUZZ_JOBS:-1}
san=${FUZZ_SAN:-none}
if [ -n "${FUZZ_TARGETS:-}" ]; then
    read -r -a targets <<<"$FUZZ_TARGETS"
else
    targets=()
    for f in fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi
for t in "${targets[@]}"; do
    [ -f "fuzz_targets/$t.rs" ] || { echo "fuzz: FUZZ_TARGETS: no target '$t' in fuzz/fuzz_targets/" >&2; exit 2; }
done
case "$san" in
    none) build=(-O -a -s none --target-dir target/nosan); bindir=target/nosan ;;
    address) build=(-O -s address); bindir=target ;;
    *) echo "fuzz: FUZZ_SAN: '$san' is not none or address" >&2; exit 2 ;;
esac
bindir=$bindir/$(rustc -vV | awk '/^host:/ {print $2}')/release
for n in "$runs" "$parallel" "$jobs"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "fuzz: FUZZ_RUNS, FUZZ_PARALLEL and FUZZ_JOBS take a positive number, not '$n'" >&2; exit 2; }
done

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz: installing the nightly toolchain" >&2
    rustup toolchain install nightly --profile minimal >&2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked >&2
fi

mkdir -p logs
cargo +nightly fuzz build "${build[@]}" >logs/build.log 2>&1 || {
    tail -n 30 logs/build.log >&2
    exit 1
}

# One campaign: its stats in logs/TARGET.log, a table row in logs/TARGET.row.
campaign() {
    local t=$1 start end secs log=logs/$1.log
    mkdir -p "corpus-work/$t" "artifacts/$t"
    local slow_before
    slow_before=$(find "artifacts/$t" -name 'slow-unit-*' | wc -l)
    start=$(date +%s)
    local status=none
    local logs=("$log")
    if [ "$jobs" -eq 1 ]; then
        cargo +nightly fuzz run "${build[@]}" "$t" "corpus-work/$t" "corpus/$t" -- \
            -runs="$runs" -print_final_stats=1 >"$log" 2>&1 || status="FOUND: see fuzz/$log and fuzz/artifacts/$t/"
    else
        # libFuzzer's jobs write fuzz-N.log in their working directory.
        rm -rf "logs/$t.jobs" && mkdir -p "logs/$t.jobs"
        (cd "logs/$t.jobs" && "../../$bindir/$t" "../../corpus-work/$t" "../../corpus/$t" \
            -artifact_prefix="../../artifacts/$t/" -jobs="$jobs" -workers="$jobs" \
            -runs=$(((runs + jobs - 1) / jobs)) -print_final_stats=1) >"$log" 2>&1 || true
        logs=("logs/$t.jobs"/fuzz-*.log)
        grep -q -E '^==[0-9]+== ERROR|deadly signal|panicked at' "${logs[@]}" &&
            status="FOUND: see fuzz/logs/$t.jobs/ and fuzz/artifacts/$t/"
    fi
    end=$(date +%s)
    secs=$((end - start))
    local inputs cov slow
    inputs=$(awk '/stat::number_of_executed_units:/ {n += $2} END {print n}' "${logs[@]}")
    cov=$(grep -h -E '^#[0-9]+' "${logs[@]}" | tail -n 1 | sed -E 's/.*cov: ([0-9]+) ft: ([0-9]+).*/\1 \/ \2/')
    slow=$(($(find "artifacts/$t" -name 'slow-unit-*' | wc -l) - slow_before))
    if [ "$slow" -gt 0 ]; then
        status="$status ($slow slow-unit report(s) in fuzz/artifacts/$t/)"
    fi
    printf '| `%s` | %s | %s s | %s | %s | %s |\n' "$t" "${inputs:-?}" "$secs" \
        "$(( ${inputs:-0} / (secs > 0 ? secs : 1) ))" "${cov:-?}" "$status" >"logs/$t.row"
    echo "fuzz: $t done: $(cat "logs/$t.row")" >&2
}

for t in "${targets[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$parallel" ]; do wait -n || true; done
    echo "fuzz: $t: $runs inputs ($san sanitizer, $jobs worker(s)), log fuzz/logs/$t.log" >&2
    campaign "$t" &
done
wait

echo "| target | inputs | time | exec/s | cov / ft at the end | finding |"
echo "|---|---|---|---|---|---|"
fail=0
for t in "${targets[@]}"; do
    cat "logs/$t.row"
    grep -q '| FOUND' "logs/$t.row" && fail=1
done
exit $fail
