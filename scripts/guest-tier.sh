#!/usr/bin/env bash
# Run the real-guest tests (`linux_guest::`) of one test binary, each in a process of its own
# with a time limit, so one hung test fails with its own output instead of eating the whole
# CI budget. Runs where real guests boot: natively, or inside fcvm-testhost (scripts/test.sh
# calls it through on_real_kvm).
#
#   guest-tier.sh [--budget SECONDS] [--per-test SECONDS] [--each-on-real-kvm [--lanes N|auto]]
#                 TEST_BINARY [FILTER...]
#
# --budget bounds the whole tier: a test is given at most what remains of it, and tests that
# no longer fit are reported as not run (a failure), never silently dropped.
# --each-on-real-kvm runs every test through on_real_kvm (scripts/lib.sh): on a host whose
# guests do not boot natively, each test gets an emulated KVM host of its own (~10 s to boot),
# so an emulated host that dies (its kernel once hit a stack guard page under three
# concurrent guests) fails one test run, not every test after it.
# --lanes runs that many emulated hosts at once, each taking the next test from one queue. The
# tests spend much of their time waiting on guests that sleep, boot or time out, so two lanes
# on 2 cores finish well before one lane would (each test a little slower: a CI run on a loaded
# machine did 31 tests, ~6,500 s of their own times, in 3,376 s); `auto` gives as many as
# memory holds (FCVM_TESTHOST_MEM each, with 4 GiB to spare), at most 2 and at most the cores.
set -uo pipefail

budget=3600
per_test=600
each=""
lanes=1
while [ $# -gt 0 ]; do
    case "$1" in
    --budget) budget=$2; shift 2 ;;
    --per-test) per_test=$2; shift 2 ;;
    --each-on-real-kvm) each=1; shift ;;
    --lanes) lanes=$2; shift 2 ;;
    *) break ;;
    esac
done
if [ $# -lt 1 ]; then
    echo "usage: guest-tier.sh [--budget SECONDS] [--per-test SECONDS] [--each-on-real-kvm [--lanes N|auto]] TEST_BINARY [FILTER...]" >&2
    exit 2
fi
if [ "$lanes" = auto ]; then
    avail_mib=$(($(sed -n 's/^MemAvailable: *\([0-9]*\) kB/\1/p' /proc/meminfo) / 1024))
    lanes=$(((avail_mib - 4096) / ${FCVM_TESTHOST_MEM:-8192}))
    cores=$(nproc)
    [ "$lanes" -gt 2 ] && lanes=2
    [ "$lanes" -gt "$cores" ] && lanes=$cores
    [ "$lanes" -lt 1 ] && lanes=1
fi
case "$lanes" in
'' | *[!0-9]* | 0) echo "error: --lanes wants a positive number or auto, not '$lanes'" >&2; exit 2 ;;
esac
if [ "$lanes" -gt 1 ] && [ -z "$each" ]; then
    # Natively, the tests of two lanes would share one host's VMs, TAPs and leftovers reaping.
    echo "error: --lanes above 1 needs --each-on-real-kvm (an emulated host per test)" >&2
    exit 2
fi
bin=$1
shift
# Test-name filters (substrings; a test matching any of them runs).
filters=("${@:-linux_guest::}")
if [ -n "$each" ]; then
    # shellcheck source=lib.sh
    source "$(dirname "$0")/lib.sh"
fi
if [ "$lanes" -gt 1 ] && guests_boot_natively; then
    # on_real_kvm then runs the tests on this host itself, where two at once would share its
    # VMs, TAPs and leftovers reaping.
    echo "== guests boot natively here: one lane" >&2
    lanes=1
fi
logs=$(mktemp -d /tmp/guest-tier.XXXXXX)
deadline=$((SECONDS + budget))

# `--list` prints "NAME: test" for every test, ignored ones included. Through files, not a
# process substitution: the emulated host has no /dev/fd.
if ! "$bin" --list "${filters[@]}" >"$logs/list" 2>"$logs/list.err"; then
    echo "error: cannot list the tests of $bin:" >&2
    cat "$logs/list.err" >&2
    exit 1
fi
sed -n 's/: test$//p' "$logs/list" >"$logs/names"
# Longest first, by the times of an earlier full run (scripts/guest-tier.times: seconds and
# name per line; FCVM_TEST_TIMES overrides), so that no lane is left with a long test while
# the other has nothing to do. Tests it does not list go first: they may be long too. Only the
# order depends on it. Remake it from a run's table:
#   sed -n 's/^ *ok *\([^ ]*\) (\([0-9]*\)s)$/\2 \1/p' RUN.log | sort -nr >scripts/guest-tier.times
times=${FCVM_TEST_TIMES:-$(dirname "$0")/guest-tier.times}
if [ -f "$times" ]; then
    awk 'NR == FNR { t[$2] = $1; next } { print ($0 in t ? t[$0] : 999999), $0 }' \
        "$times" "$logs/names" | sort -s -k1,1nr | cut -d' ' -f2- >"$logs/names.sorted"
    mv "$logs/names.sorted" "$logs/names"
fi
tests=()
while IFS= read -r name; do
    tests+=("$name")
done <"$logs/names"
if [ "${#tests[@]}" -eq 0 ]; then
    echo "error: no test matches '${filters[*]}' in $bin" >&2
    exit 1
fi
echo "== ${#tests[@]} real-guest tests, at most ${per_test}s each, ${budget}s in all, $lanes at a time (logs in $logs)"

# A test killed on its time limit cannot clean up. timeout(1) signals its whole process group,
# which takes the fcvm processes the test started; a VMM that outlived them is ended here, but
# only in a host that exists for these tests (fcvm-testhost's L1, or a CI machine), never among
# a developer's own VMs. The next fcvm command reaps records and namespaces.
reap_leftovers() {
    # With an emulated host per test, the test's VMs ended with that host.
    [ -n "$each" ] && return
    if grep -q 'fcvm.runner=' /proc/cmdline || [ -n "${CI:-}" ]; then
        pkill -KILL -x firecracker 2>/dev/null
        sleep 1
    fi
}

# One run of test $1 with a limit of what remains (at most --per-test); sets `result` to
# ok, ignored, failed or timeout, and `took` to its seconds. Returns 1 when no time is left.
run_one() {
    local t=$1 log=$2 left limit start rc
    left=$((deadline - SECONDS))
    if [ "$left" -lt 60 ]; then
        return 1
    fi
    limit=$((left < per_test ? left : per_test))
    start=$SECONDS
    echo "-- $t (limit ${limit}s)"
    if [ -n "$each" ]; then
        # The limit is on the emulated host (fcvm-testhost ends QEMU on SIGTERM), or on the
        # test itself where guests boot natively.
        FCVM_TESTHOST_TIMEOUT=$((limit + 60)) on_real_kvm timeout --kill-after=15 "$limit" \
            "$bin" --exact "$t" --test-threads=1 --nocapture >"$log" 2>&1
    else
        timeout --kill-after=15 "$limit" "$bin" --exact "$t" --test-threads=1 --nocapture >"$log" 2>&1
    fi
    rc=$?
    took=$((SECONDS - start))
    if [ "$rc" -eq 0 ] && grep -q '^test result: ok. 0 passed; 0 failed; 1 ignored' "$log"; then
        result=ignored
    elif [ "$rc" -eq 0 ]; then
        result=ok
    elif grep -q '^fcvm-testhost: error: L1 ended before' "$log"; then
        # The emulated host's own kernel died (seen: an interrupt taken inside
        # __svm_vcpu_run before the host's GS base is back, under QEMU's TCG), not the test.
        result="emulated host died"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        result="timeout (killed after ${limit}s)"
        reap_leftovers
    else
        result="failed (exit $rc)"
    fi
}

# What one test ended as, for the table: one line in $logs/result.INDEX, written by its lane.
# Output about a failure is written whole under a lock, so two lanes' reports never interleave.
report() {
    flock "$logs/print.lock" cat "$1"
}
# Run test number $1 (one run, and a second after a failure), and write its result line.
run_test() {
    local i=$1 t=${tests[$1]} log out first hosts_died
    log="$logs/${t//::/__}.log"
    out="$logs/report.$i"
    : >"$out"
    if ! run_one "$t" "$log"; then
        echo "NOT RUN  $t (the tier's ${budget}s budget is spent)" >"$logs/result.$i"
        return
    fi
    if [ "$result" = ignored ]; then
        echo "ignored  $t" >"$logs/result.$i"
        return
    fi
    if [ "$result" = ok ]; then
        echo "ok       $t (${took}s)" >"$logs/result.$i"
        return
    fi
    # The emulated host runs guests 5-10x slower than bare metal, with rare stalls of its own:
    # a failed test runs once more, and a pass on the second run is reported as FLAKY (with the
    # first run's output above), never as a plain pass.
    first="$result after ${took}s"
    {
        echo "---- $t: $first; the last 150 lines of its output:"
        tail -n 150 "$log"
        echo "---- end of $t; running it once more"
    } >>"$out"
    report "$out"
    : >"$out"
    # A dead emulated host says nothing of the test: up to two more hosts are tried for it.
    hosts_died=0
    while run_one "$t" "$log.2" && [ "$result" = "emulated host died" ] && [ "$hosts_died" -lt 2 ]; do
        hosts_died=$((hosts_died + 1))
        first="$first; emulated host died again"
        echo "---- $t: the emulated host died again; one more"
    done
    if [ "${result:-}" = ok ] && [ -f "$log.2" ]; then
        echo "FLAKY    $t (first run $first; second run passed in ${took}s)" >"$logs/result.$i"
        return
    fi
    echo "FAILED   $t (first run $first; second run ${result:-not run} after ${took:-0}s)" >"$logs/result.$i"
    if [ -f "$log.2" ]; then
        {
            echo "---- $t, second run: the last 150 lines of its output:"
            tail -n 150 "$log.2"
            echo "---- end of $t"
        } >>"$out"
        report "$out"
    fi
}

# A lane takes the next test number from the queue (a counter file under a lock) until none
# is left.
echo 0 >"$logs/next"
lane() {
    local i
    while :; do
        i=$(flock "$logs/next.lock" sh -c 'i=$(cat "$1"); echo $((i + 1)) >"$1"; echo "$i"' _ "$logs/next")
        [ "$i" -lt "${#tests[@]}" ] || return 0
        result="" took=""
        run_test "$i"
    done
}
for n in $(seq 1 "$lanes"); do
    lane &
    # Emulated hosts starting in the same second contend for the cores while both boot.
    [ "$n" -lt "$lanes" ] && sleep 5
done
wait

passed=0 failed=0 ignored=0 flaky=0
summary=()
for i in "${!tests[@]}"; do
    line=$(cat "$logs/result.$i" 2>/dev/null || echo "NOT RUN  ${tests[$i]} (its lane ended without a result)")
    summary+=("$line")
    case "$line" in
    "ok "* ) passed=$((passed + 1)) ;;
    FLAKY*) passed=$((passed + 1)); flaky=$((flaky + 1)) ;;
    ignored*) ignored=$((ignored + 1)) ;;
    *) failed=$((failed + 1)) ;;
    esac
done

echo "== real-guest tier: $passed passed ($flaky of them on a second run), $failed failed, $ignored ignored, ${SECONDS}s"
printf '   %s\n' "${summary[@]}"
[ "$failed" -eq 0 ]
