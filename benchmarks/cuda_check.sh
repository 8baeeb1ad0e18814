#!/usr/bin/env bash
# Everything fusedopt checks on a GPU, in one run: build for sm_90, the CUDA tests, the
# compute sanitizer on a representative subset, and the CUDA benchmark. Logs and results
# go to one folder ($OUT where the device tool sets it, else cuda-out/), and the build to
# cuda-build.tgz in it: put that in the repository root to skip the build next time.
#
#   bash benchmarks/cuda_check.sh [build] [tests] [sanitize] [bench] [bench-quick]
#
# With no stage named, all but bench-quick run. Each stage has its own time limit and the
# script goes on after a failing stage; the summary at the end gives each one's status.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-cuda-out}
mkdir -p "$out"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build tests sanitize bench)
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
summary=()

run_stage() {  # name, time limit in seconds, command...
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    summary+=("$name: rc=$rc, $((SECONDS - start)) s")
    tail -n 25 "$out/$name.log"
    return $rc
}

build() {
    # A build carried from an earlier run (cuda-build.tgz, made below) is used as it is.
    if [ -f cuda-build.tgz ]; then tar xzf cuda-build.tgz && return; fi
    rm -rf build
    # The GPU image sets CXX=/opt/gcc/bin/g++, a wrapper around GCC 13.3 with its own
    # library paths. Modules it built export 4137 std:: symbols (11 with /usr/bin/g++), and
    # every error whose message holds a number segfaulted in std::ostream instead of raising.
    # Build with the system compiler, the one torch was built with (torch.__config__).
    if [ -x /usr/bin/g++ ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++; fi
    # No -j: torch's ninja build writes one build.ninja per build folder, so extensions built
    # in parallel overwrite each other's (and the CPU variants share one object file).
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) $python setup.py build_ext --inplace &&
        tar czf "$out/cuda-build.tgz" fusedopt/*.so fusedopt/_build_info.py
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
    $python -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda)'
    nproc; uptime
} >"$out/summary.txt" 2>&1
cat "$out/summary.txt"

for stage in "${stages[@]}"; do
    case $stage in
    build) export -f build; export python out; run_stage build 400 bash -c build || break ;;
    tests)
        # The op-by-op CUDA tests, then every test parametrized over the cuda device.
        run_stage test_cuda 300 $python -m pytest -q -rfE tests/test_cuda.py
        run_stage tests_cuda_params 300 $python -m pytest -q -rfE tests -k cuda --ignore tests/test_cuda.py ;;
    sanitize)
        # Both layouts, all dtypes, strided grads, many small params, both algorithms.
        for tool in memcheck racecheck; do
            run_stage "sanitize_$tool" 240 compute-sanitizer --tool "$tool" --error-exitcode 9 \
                $python -m pytest -q -x tests/test_cuda.py \
                -k "not 2_pow_31 and not second_device"
        done ;;
    bench)
        # Without many-small: compiling torch's step over its 3000 tensors ran past 170 s on
        # an H100. Then many-small without that peer.
        run_stage bench 420 $python -m fusedopt.bench --device cuda --models gpt2-small,resnet50,bert-base \
            --out "$out/bench"
        run_stage bench_many_small 120 $python -m fusedopt.bench --device cuda --models many-small \
            --skip compiled --out "$out/bench-many-small" ;;
    bench-quick) run_stage bench_quick 200 $python -m fusedopt.bench --device cuda --quick \
        --models gpt2-small,many-small --algos sgd,adamw --out "$out/bench" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
    esac
done
printf '%s\n' "${summary[@]}" | tee -a "$out/summary.txt"
