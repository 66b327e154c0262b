#!/usr/bin/env bash
# The GPU check: one command for a machine with an NVIDIA GPU and a CUDA build of torch, no
# network. Within 8 minutes (GPU_CHECK_SECONDS) it
#   1. builds diffkern with its CUDA kernels for this GPU against the torch already installed
#      (pip install --no-deps --no-build-isolation --no-index: nothing is fetched),
#   2. runs every test marked `cuda`, then every Triton test on the GPU (no interpreter),
#   3. runs `diffkern bench --device cuda` (--quick first, then the full run in the time left),
# writing every log, the JUnit XML, the JSON reports, the PNGs and summary.txt to OUT_DIR.
#
#   scripts/gpu_check.sh OUT_DIR            on the GPU machine (PYTHON=... to pick the interpreter)
#   scripts/gpu_check.sh --check [OUT_DIR]  anywhere: validates each step without a GPU (a dry run)
#
# diffkern is pip-installed (editable) into PYTHON's environment, which must be writable and
# hold torch (CUDA build), setuptools, wheel and pytest; triton, scipy, ninja and matplotlib are
# optional (what is left out without them, and why, is written to the summary).
#
# Exit status: 0 every step ran and passed; 1 a step failed or could not run (summary.txt says
# which and why); 2 bad usage. It never downloads anything.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
TOTAL_S="${GPU_CHECK_SECONDS:-480}"
CHECK=0
if [[ "${1:-}" == "--check" ]]; then CHECK=1; shift; fi
if [[ $# -gt 1 || ( $CHECK == 0 && $# -ne 1 ) || "${1:-}" == -* ]]; then
    echo "usage: scripts/gpu_check.sh OUT_DIR | scripts/gpu_check.sh --check [OUT_DIR]" >&2
    exit 2
fi
OUT="${1:-${TMPDIR:-/tmp}/diffkern-gpu-check}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"

# Nothing may be fetched: pip, the Hugging Face hub and transformers stay offline.
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# The Triton tests run compiled on CUDA tensors (tests/conftest.py honours this switch).
export DIFFKERN_TRITON_TESTS=native
PYTEST=("$PY" -m pytest -p no:cacheprovider -o "addopts=" -ra)
SKIPPED_ALWAYS="tests/compile (compile-only nvcc / Triton AOT checks; the CPU CI runs them)"

SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0
note() { echo "$*" | tee -a "$SUMMARY"; }
remaining() { echo $(( TOTAL_S - SECONDS )); }

# run_step NAME CAP_S CMD...: run CMD with its output in OUT/NAME.log, at most CAP_S seconds
# (and never past the overall deadline); record ok / FAILED / TIMED OUT in the summary.
run_step() {
    local name="$1" cap="$2"; shift 2
    local left; left="$(remaining)"
    local limit=$(( cap < left ? cap : left ))
    if (( limit < 10 )); then
        note "  $name: SKIPPED (the ${TOTAL_S} s budget is spent)"; FAILED=1; return 1
    fi
    local t0=$SECONDS rc
    echo "+ $*" > "$OUT/$name.log"
    timeout --kill-after=10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
    rc=$?
    local took=$(( SECONDS - t0 )) tail
    tail="$(grep -E '^(=+ .*(passed|failed|error|skipped|deselected).* =+|FAILED|ERROR)' "$OUT/$name.log" | tail -n 1)"
    if (( rc == 124 || rc == 137 )); then
        note "  $name: TIMED OUT after ${took} s (limit ${limit} s)   $OUT/$name.log"; FAILED=1
    elif (( rc != 0 )); then
        note "  $name: FAILED (exit $rc, ${took} s)   $OUT/$name.log ${tail:+  [$tail]}"; FAILED=1
    else
        note "  $name: ok (${took} s)   $OUT/$name.log ${tail:+  [$tail]}"
    fi
    return $rc
}

# Which GPU, which toolchain; prints KEY=VALUE lines (the arch list for the build among them).
probe_environment() {
    "$PY" - <<'EOF'
import importlib.util, os, shutil, subprocess, sys
import torch
from torch.utils import cpp_extension
print(f"python={sys.version.split()[0]}")
print(f"torch={torch.__version__}")
print(f"torch_cuda={torch.version.cuda or ''}")
print(f"cuda_device={int(torch.cuda.is_available())}")
if torch.cuda.is_available():
    major, minor = torch.cuda.get_device_capability()
    print(f"gpu={torch.cuda.get_device_name()}")
    print(f"arch={major}.{minor}")
home = cpp_extension.CUDA_HOME or ""
nvcc = os.path.join(home, "bin", "nvcc") if home else (shutil.which("nvcc") or "")
print(f"cuda_home={home}")
if nvcc and os.path.exists(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    print(f"nvcc={out.strip().splitlines()[-1] if out.strip() else nvcc}")
else:
    print("nvcc=")
for module in ("triton", "pytest", "scipy", "matplotlib", "setuptools", "wheel", "ninja", "tqdm", "numpy"):
    spec = importlib.util.find_spec(module)
    version = ""
    if spec is not None:
        try:
            version = getattr(__import__(module), "__version__", "present")
        except Exception as exc:  # a broken install reads as missing, with why
            version = ""
            print(f"{module}_error={type(exc).__name__}: {exc}")
    print(f"{module}={version}")
EOF
}

# ---- preflight ------------------------------------------------------------------------------
note "diffkern GPU check$( [[ $CHECK == 1 ]] && echo ' --check (dry run: validates the steps, runs nothing on a GPU)' ) -> $OUT"
if ! ENV_LINES="$(probe_environment 2> "$OUT/preflight.log")"; then
    note "  preflight: FAILED: $PY cannot import torch (set PYTHON=/path/to/python)   $OUT/preflight.log"
    exit 1
fi
echo "$ENV_LINES" > "$OUT/environment.txt"
env_value() { sed -n "s/^$1=//p" <<< "$ENV_LINES" | head -n 1; }
GPU="$(env_value gpu)"; ARCH="${TORCH_CUDA_ARCH_LIST:-$(env_value arch)}"
note "  environment: python $(env_value python), torch $(env_value torch) (CUDA '$(env_value torch_cuda)'), \
nvcc '$(env_value nvcc)', triton '$(env_value triton)', GPU '${GPU:-none}' ${ARCH:+(arch $ARCH)}"

# Every reason a step cannot run; on the GPU machine each one stops the check before the build.
PROBLEMS=()
[[ -n "$(env_value torch_cuda)" ]] || PROBLEMS+=("torch $(env_value torch) is not a CUDA build")
[[ "$(env_value cuda_device)" == 1 ]] || PROBLEMS+=("no CUDA device is visible")
[[ -n "$(env_value nvcc)" ]] || PROBLEMS+=("nvcc not found (CUDA_HOME / PATH): the CUDA kernels cannot be built")
for module in setuptools wheel pytest; do
    [[ -n "$(env_value $module)" ]] || PROBLEMS+=("python package '$module' is missing (no network: install it beforehand)")
done

# Optional pieces: say what is left out and why, then go on.
HAVE_TRITON=1
[[ -n "$(env_value triton)" ]] || { HAVE_TRITON=0; note "  will skip the Triton tests: triton is not installed (the bench reports its rows as skipped)"; }
[[ -n "$(env_value ninja)" ]] || note "  note: ninja is missing; the build falls back to serial setuptools compiles (slower)"
[[ -n "$(env_value matplotlib)" ]] || note "  note: matplotlib is missing; the bench writes no PNG"
note "  always skipped: $SKIPPED_ALWAYS"

# A test module that cannot be imported here (an optional package such as scipy or diffusers is
# missing, and nothing can be fetched) would stop pytest's whole collection: such modules are
# left out by name, with the import error as the reason.
IGNORED=(--ignore=tests/compile)
ignore_unimportable_test_modules() {
    "${PYTEST[@]}" "${IGNORED[@]}" --collect-only -q --continue-on-collection-errors tests > "$OUT/collect.log" 2>&1
    local path reason
    while IFS=$'\t' read -r path reason; do
        IGNORED+=("--ignore=$path")
        note "  will skip $path: it cannot be imported here ($reason)"
    done < <(awk '/^_+ ERROR collecting /{f=$4} /^E   / && f {sub(/^E +/, ""); print f "\t" $0; f=""}' "$OUT/collect.log")
}

BUILD=(env FORCE_CUDA=1 "TORCH_CUDA_ARCH_LIST=${ARCH:-9.0}" "MAX_JOBS=${MAX_JOBS:-$(nproc)}"
       "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .)
# the build counts only if `diffkern info` then lists the cuda backend as available
VERIFY_BUILD=("$PY" -m diffkern.cli info)
available_in_info() { grep -Eq "^ +$1 +available " "$2"; }   # BACKEND LOGFILE
tests_cmd() { TESTS=("${PYTEST[@]}" "${IGNORED[@]}" "$@" tests); }   # SELECTION... -> TESTS
BENCH=("$PY" -m diffkern.cli bench --device cuda --no-progress)

# ---- --check: validate every step here, without a GPU ---------------------------------------
if [[ $CHECK == 1 ]]; then
    for problem in "${PROBLEMS[@]}"; do note "  on a GPU machine this would stop the check: $problem"; done
    check() {   # check DESCRIPTION CMD...: CMD must succeed
        local what="$1"; shift
        if "$@" >> "$OUT/check.log" 2>&1; then note "  check ok: $what"; else note "  check FAILED: $what   $OUT/check.log"; FAILED=1; fi
    }
    echo "steps a GPU run executes, in order:" >> "$SUMMARY"
    show() { echo "    $(printf '%q ' "$@")" >> "$SUMMARY"; }
    DIFFKERN_TRITON_TESTS=interpret ignore_unimportable_test_modules
    show "${BUILD[@]}"; show "${VERIFY_BUILD[@]}"
    tests_cmd -m cuda "--junitxml=$OUT/tests-cuda.xml"; show "${TESTS[@]}"; TESTS_CUDA=("${TESTS[@]}")
    tests_cmd -k triton "--junitxml=$OUT/tests-triton.xml"; show "${TESTS[@]}"; TESTS_TRITON=("${TESTS[@]}")
    show "${BENCH[@]}" --quick --json "$OUT/bench-quick.json" --png "$OUT/bench-quick.png"
    show "${BENCH[@]}" --json "$OUT/bench.json" --png "$OUT/bench.png" --budget-s "<time left - 60>"
    check "this script parses (bash -n)" bash -n "${BASH_SOURCE[0]}"
    check "pip takes --no-deps --no-build-isolation --no-index" \
        bash -c 'help=$("$1" -m pip install --help) && [[ $help == *--no-build-isolation* && $help == *--no-index* ]]' _ "$PY"
    check "setup.py builds csrc/cuda on FORCE_CUDA=1 for TORCH_CUDA_ARCH_LIST" \
        bash -c 'grep -q FORCE_CUDA setup.py && grep -q TORCH_CUDA_ARCH_LIST setup.py && ls csrc/cuda/*.cu'
    "${VERIFY_BUILD[@]}" > "$OUT/info.log" 2>&1
    check "the build verification reads diffkern info (its cpu line here)" available_in_info cpu "$OUT/info.log"
    check "test modules that cannot be imported are found (collect.log)" grep -q "collected" "$OUT/collect.log"
    check "tests marked cuda are collected" \
        bash -c 'DIFFKERN_TRITON_TESTS=interpret "$@" --collect-only -q | grep "::"' _ "${TESTS_CUDA[@]}"
    check "Triton tests are collected" \
        bash -c 'DIFFKERN_TRITON_TESTS=interpret "$@" --collect-only -q | grep "::"' _ "${TESTS_TRITON[@]}"
    if [[ "$(env_value cuda_device)" != 1 ]]; then
        check "tests/conftest.py honours DIFFKERN_TRITON_TESTS=native (refuses without a GPU)" \
            bash -c 'out=$("$@" --collect-only -q tests/test_poe_triton.py 2>&1); rc=$?; echo "$out"
                     (( rc != 0 )) && [[ $out == *"DIFFKERN_TRITON_TESTS=native"* ]]' _ "${PYTEST[@]}"
        check "bench --device cuda refuses in one line without a GPU" \
            bash -c 'out=$("$@" --quick 2>&1); rc=$?; echo "$out"; (( rc == 2 )) && [[ $(wc -l <<< "$out") == 1 ]]' \
            _ "${BENCH[@]}"
    fi
    check "bench takes --device cuda, --quick, --json, --png, --budget-s" \
        bash -c 'help=$("$1" -m diffkern.cli bench --help) && [[ $help == *"--device {cpu,cuda}"* && $help == *--budget-s* ]]' _ "$PY"
    note "GPU steps not executed: --check validates them; run scripts/gpu_check.sh OUT_DIR on a GPU machine"
    (( FAILED == 0 )) && note "check passed" || note "check FAILED"
    exit $FAILED
fi

# ---- the GPU run ----------------------------------------------------------------------------
if (( ${#PROBLEMS[@]} )); then
    for problem in "${PROBLEMS[@]}"; do note "  cannot run: $problem"; done
    note "skipped: build, tests, bench (see above)"
    exit 1
fi
echo "steps (logs in $OUT):" | tee -a "$SUMMARY"
built() {
    run_step build 300 "${BUILD[@]}" && run_step build-verify 60 "${VERIFY_BUILD[@]}" || return 1
    available_in_info cuda "$OUT/build-verify.log" && return 0
    note "  build-verify: FAILED: diffkern info does not list the cuda backend as available"; FAILED=1; return 1
}
if built; then
    ignore_unimportable_test_modules
    tests_cmd -m cuda "--junitxml=$OUT/tests-cuda.xml"
    run_step tests-cuda 120 "${TESTS[@]}"
    if (( HAVE_TRITON )); then
        tests_cmd -k triton "--junitxml=$OUT/tests-triton.xml"
        run_step tests-triton 180 "${TESTS[@]}"
    fi
    run_step bench-quick 90 "${BENCH[@]}" --quick --json "$OUT/bench-quick.json" --png "$OUT/bench-quick.png"
    # the full run starts no case in the last 60 s, so it ends with its JSON inside the budget
    left="$(remaining)"
    run_step bench "$left" "${BENCH[@]}" --json "$OUT/bench.json" --png "$OUT/bench.png" --budget-s $(( left - 60 > 0 ? left - 60 : 0 ))
    grep -q "skipped: time budget" "$OUT/bench.log" 2>/dev/null \
        && note "  bench: the cases it had no time for are marked 'skipped: time budget' in bench.log and bench.json"
else
    note "skipped: tests and bench, because the build failed (see build.log / build-verify.log)"
fi
grep -h '^SKIPPED' "$OUT"/tests-*.log > "$OUT/tests-skipped.txt" 2>/dev/null
[[ -s "$OUT/tests-skipped.txt" ]] && note "  skipped tests and why: $OUT/tests-skipped.txt ($(wc -l < "$OUT/tests-skipped.txt") lines)"
note "total ${SECONDS} s; $( (( FAILED == 0 )) && echo 'all steps passed' || echo 'SOME STEPS FAILED' )"
exit $FAILED
