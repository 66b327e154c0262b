"""Compile-only checks of the CUDA kernels (this machine has nvcc but no GPU).

Every ``csrc/cuda/*.cu`` is compiled once per architecture (sm_80, sm_90) with
``-O3 -std=c++17 -Xptxas -v`` (plus ``-warn-spills,-warn-lmem-usage``) and ptxas' per-kernel
report is checked: no spill stores/loads, no local memory (stack frame 0, no "Local memory used"
warning) and registers within a budget. The .cu files must stay torch-free (no torch / ATen /
c10 includes) so that this compile works without a CUDA torch.

Register budgets (nvcc 13.0 measurements in csrc/cuda/chebyshev_kernels.cu's header comment):

* ``chebyshev_combine_kernel`` vector variant (V > 1): 80. Measured 78-80 for 16-bit inputs (4 outputs
  x 8 elements = 32 fp32 accumulators plus two 16-byte loads in flight) and 54-64 for f32/f64
  inputs. 80 is the largest count that keeps 3 blocks of 256 threads (24 warps) resident per SM
  (65536 / (3 * 256) = 85, allocated in units of 8). The kernel's __launch_bounds__(256, 3) makes
  ptxas hold that line, so the check that really guards it is "0 spills": if the code grows past
  80 registers, ptxas spills instead and this test fails.
* ``chebyshev_combine_kernel`` scalar variant (V = 1): 56. Measured 43-48; 56 keeps 4 blocks/SM.
* anything else: 64 until it gets its own measured budget.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
INCLUDE_DIR = ROOT / "csrc" / "include"
ARCHS = ("sm_80", "sm_90")
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))

# (regex on the mangled kernel name, register budget); first match wins.
REGISTER_BUDGETS = [
    (re.compile(r"chebyshev_combine_kernel.*Li1EEEv"), 56),   # scalar variant, V = 1
    (re.compile(r"chebyshev_combine_kernel"), 80),            # 16-byte vector variants
    (re.compile(r"."), 64),
]


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _budget(kernel: str) -> int:
    return next(budget for pattern, budget in REGISTER_BUDGETS if pattern.search(kernel))


def _parse_ptxas(report: str) -> dict[str, dict]:
    """Per entry function: registers, stack, spill stores/loads, smem, local-memory warning."""
    kernels = {}
    parts = re.split(r"ptxas info\s*: Compiling entry function '([^']+)'", report)
    for name, body in zip(parts[1::2], parts[2::2]):
        regs = re.search(r"Used (\d+) registers", body)
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", body)
        smem = re.search(r"(\d+) bytes smem", body)
        kernels[name] = {
            "registers": int(regs.group(1)) if regs else None,
            "stack": int(frame.group(1)) if frame else None,
            "spill_stores": int(frame.group(2)) if frame else None,
            "spill_loads": int(frame.group(3)) if frame else None,
            "smem": int(smem.group(1)) if smem else 0,
        }
    for name in re.findall(r"Local memory used for function '([^']+)'", report):
        kernels.setdefault(name, {})["local_memory_warning"] = True
    return kernels


def _compile(nvcc: str, cu: Path, arch: str, out_dir: Path) -> dict:
    out = out_dir / f"{cu.stem}.{arch}.o"
    cmd = [nvcc, f"-arch={arch}", "-O3", "-std=c++17", "-Xptxas", "-v", "-Xptxas",
           "-warn-spills,-warn-lmem-usage", "-I", str(INCLUDE_DIR), "-c", "-o", str(out), str(cu)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    return {"cmd": " ".join(cmd), "returncode": proc.returncode, "seconds": time.perf_counter() - start,
            "report": proc.stdout + proc.stderr, "kernels": _parse_ptxas(proc.stdout + proc.stderr)}


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[tuple[str, str], dict]:
    """Compile every .cu once per arch (in parallel); the .o files stay in a pytest temp dir."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): CUDA compile checks skipped")
    out_dir = tmp_path_factory.mktemp("nvcc")
    jobs = [(cu, arch) for cu in CU_FILES for arch in ARCHS]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        futures = {job: pool.submit(_compile, nvcc, job[0], job[1], out_dir) for job in jobs}
        return {(cu.name, arch): f.result() for (cu, arch), f in futures.items()}


def test_there_are_cuda_sources():
    assert CU_FILES, f"no .cu files under {CUDA_DIR}"


@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_cu_files_are_torch_free(cu):
    includes = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', cu.read_text(), flags=re.M)
    banned = [inc for inc in includes if re.match(r"(torch|ATen|c10|caffe2|pybind11)/", inc)
              or inc in ("torch.h", "Python.h")]
    assert not banned, f"{cu.name} includes {banned}: device code must stay torch-free (raw pointers + stream)"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_ptxas_resources(builds, cu, arch):
    build = builds[(cu.name, arch)]
    assert build["returncode"] == 0, f"{build['cmd']} failed:\n{build['report'][-4000:]}"
    kernels = build["kernels"]
    assert kernels, f"ptxas reported no entry functions for {cu.name} ({arch}):\n{build['report'][-2000:]}"
    problems = []
    for name, info in kernels.items():
        budget = _budget(name)
        if info.get("local_memory_warning"):
            problems.append(f"{name}: ptxas says 'Local memory used'")
        if info.get("spill_stores") or info.get("spill_loads"):
            problems.append(f"{name}: spills {info['spill_stores']} B stores / {info['spill_loads']} B loads")
        if info.get("stack"):
            problems.append(f"{name}: {info['stack']} bytes stack frame (local memory)")
        if info.get("registers") is None:
            problems.append(f"{name}: no register count in the ptxas report")
        elif info["registers"] > budget:
            problems.append(f"{name}: {info['registers']} registers > budget {budget}")
    assert not problems, f"{cu.name} ({arch}):\n  " + "\n  ".join(problems)


def test_chebyshev_combine_kernel_instantiations(builds):
    """All 4 x 4 dtype pairs x {vector, scalar} kernels exist for every arch."""
    for arch in ARCHS:
        names = [n for n in builds[("chebyshev_kernels.cu", arch)]["kernels"] if "chebyshev_combine_kernel" in n]
        assert len(names) == 32, f"{arch}: expected 32 chebyshev_combine_kernel instantiations, got {len(names)}"


_HEADER_PROBE = r"""
// Device use of the torch-free shared headers (written by tests/compile/test_nvcc.py).
#include <cstdint>
#include "diffkern/philox.h"
#include "diffkern/poe.h"

__global__ void shared_header_probe(double* u, double* z, float* e, uint64_t seed, uint64_t offset, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  u[i] = diffkern::philox::uniform(seed, offset, 4, static_cast<uint32_t>(i), 7u);
  z[i] = diffkern::philox::normal(seed, offset, 5, 3u, static_cast<uint32_t>(i));
  e[i] = diffkern::poe::fast_exp(-static_cast<float>(u[i])) + diffkern::to_float(diffkern::bf16_t{uint16_t(i)});
}
"""


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_headers_compile_for_the_device(tmp_path, arch):
    """csrc/include/diffkern/philox.h and poe.h are __host__ __device__ code: a kernel using them
    compiles for sm_80/sm_90 without spills. (philox::normal's double cos keeps CUDA's 40-byte
    argument-reduction frame for huge arguments, so a stack frame is not asserted away here.)"""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: CUDA compile checks skipped")
    cu = tmp_path / "shared_header_probe.cu"
    cu.write_text(_HEADER_PROBE)
    build = _compile(nvcc, cu, arch, tmp_path)
    assert build["returncode"] == 0, f"{build['cmd']} failed:\n{build['report'][-4000:]}"
    (info,) = build["kernels"].values()
    assert not info.get("spill_stores") and not info.get("spill_loads"), info
