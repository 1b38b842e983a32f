#!/usr/bin/env bash
# Run the real-guest tests (`linux_guest::`) of one test binary, each in a process of its own
# with a time limit, so one hung test fails with its own output instead of eating the whole
# CI budget. Runs where real guests boot: natively, or inside fcvm-testhost (scripts/test.sh
# calls it through on_real_kvm).
#
#   guest-tier.sh [--budget SECONDS] [--per-test SECONDS] [--each-on-real-kvm] TEST_BINARY [FILTER]
#
# --budget bounds the whole tier: a test is given at most what remains of it, and tests that
# no longer fit are reported as not run (a failure), never silently dropped.
# --each-on-real-kvm runs every test through on_real_kvm (scripts/lib.sh): on a host whose
# guests do not boot natively, each test gets an emulated KVM host of its own (~10 s to boot),
# so an emulated host that dies (its kernel once hit a stack guard page under three
# concurrent guests) fails one test run, not every test after it.
set -uo pipefail

budget=3600
per_test=600
each=""
while [ $# -gt 0 ]; do
    case "$1" in
    --budget) budget=$2; shift 2 ;;
    --per-test) per_test=$2; shift 2 ;;
    --each-on-real-kvm) each=1; shift ;;
    *) break ;;
    esac
done
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: guest-tier.sh [--budget SECONDS] [--per-test SECONDS] [--each-on-real-kvm] TEST_BINARY [FILTER]" >&2
    exit 2
fi
bin=$1
filter=${2:-linux_guest::}
if [ -n "$each" ]; then
    # shellcheck source=lib.sh
    source "$(dirname "$0")/lib.sh"
fi
logs=$(mktemp -d /tmp/guest-tier.XXXXXX)
deadline=$((SECONDS + budget))

# `--list` prints "NAME: test" for every test, ignored ones included. Through files, not a
# process substitution: the emulated host has no /dev/fd.
if ! "$bin" --list "$filter" >"$logs/list" 2>"$logs/list.err"; then
    echo "error: cannot list the tests of $bin:" >&2
    cat "$logs/list.err" >&2
    exit 1
fi
sed -n 's/: test$//p' "$logs/list" >"$logs/names"
tests=()
while IFS= read -r name; do
    tests+=("$name")
done <"$logs/names"
if [ "${#tests[@]}" -eq 0 ]; then
    echo "error: no test matches '$filter' in $bin" >&2
    exit 1
fi
echo "== ${#tests[@]} real-guest tests, at most ${per_test}s each, ${budget}s in all (logs in $logs)"

# A test killed on its time limit cannot clean up. timeout(1) signals its whole process group,
# which takes the fcvm processes the test started; a VMM that outlived them is ended here, but
# only in a host that exists for these tests (fcvm-testhost's L1, or a CI machine), never among
# a developer's own VMs. The next fcvm command reaps records and namespaces.
reap_leftovers() {
    if grep -q 'fcvm.runner=' /proc/cmdline || [ -n "${CI:-}" ]; then
        pkill -KILL -x firecracker 2>/dev/null
        sleep 1
    fi
}

passed=0 failed=0 ignored=0
summary=()
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

passed=0 failed=0 ignored=0 flaky=0
summary=()
for t in "${tests[@]}"; do
    log="$logs/${t//::/__}.log"
    if ! run_one "$t" "$log"; then
        summary+=("NOT RUN  $t (the tier's ${budget}s budget is spent)")
        failed=$((failed + 1))
        continue
    fi
    if [ "$result" = ignored ]; then
        summary+=("ignored  $t")
        ignored=$((ignored + 1))
        continue
    fi
    if [ "$result" = ok ]; then
        summary+=("ok       $t (${took}s)")
        passed=$((passed + 1))
        continue
    fi
    # The emulated host runs guests 5-10x slower than bare metal, with rare stalls of its own:
    # a failed test runs once more, and a pass on the second run is reported as FLAKY (with the
    # first run's output above), never as a plain pass.
    first="$result after ${took}s"
    echo "---- $t: $first; the last 150 lines of its output:"
    tail -n 150 "$log"
    echo "---- end of $t; running it once more"
    # A dead emulated host says nothing of the test: up to two more hosts are tried for it.
    hosts_died=0
    while run_one "$t" "$log.2" && [ "$result" = "emulated host died" ] && [ "$hosts_died" -lt 2 ]; do
        hosts_died=$((hosts_died + 1))
        first="$first; emulated host died again"
        echo "---- $t: the emulated host died again; one more"
    done
    if [ "${result:-}" = ok ] && [ -f "$log.2" ]; then
        summary+=("FLAKY    $t (first run $first; second run passed in ${took}s)")
        flaky=$((flaky + 1))
        passed=$((passed + 1))
        continue
    fi
    summary+=("FAILED   $t (first run $first; second run ${result:-not run} after ${took:-0}s)")
    failed=$((failed + 1))
    if [ -f "$log.2" ]; then
        echo "---- $t, second run: the last 150 lines of its output:"
        tail -n 150 "$log.2"
        echo "---- end of $t"
    fi
done

echo "== real-guest tier: $passed passed ($flaky of them on a second run), $failed failed, $ignored ignored, ${SECONDS}s"
printf '   %s\n' "${summary[@]}"
[ "$failed" -eq 0 ]
