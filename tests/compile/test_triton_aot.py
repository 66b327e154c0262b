"""AOT compile of the PoE Triton kernels (kernels/poe.py), the TabDiff sampler kernels
(kernels/tabdiff.py) and the shared Philox fill (kernels/philox.py) for sm_80 and sm_90, without a GPU.

The test session runs with TRITON_INTERPRET=1 (tests/conftest.py), under which ``@triton.jit``
returns interpreter objects that ``triton.compile`` cannot lower. The compile therefore runs in a
subprocess with TRITON_INTERPRET=0 that loads the ``kernels/`` package by path (fresh decorators
give real ``JITFunction`` objects; a package, so that kernels/tabdiff.py's ``from .philox import``
resolves), compiles each kernel at its GPU launch configuration with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and reports JSON.

Register / spill figures: ``compiled.metadata`` has no ``n_regs`` / ``n_spills`` until the cubin is
loaded on a device, so the worker re-runs Triton's own ptxas (``get_ptxas(arch)``: the bundled
``ptxas`` for sm_80, ``ptxas-blackwell`` for sm_90; Triton 3.9 emits PTX ISA 9.4 for sm_90, which an
older system ptxas rejects) with ``-v`` on the emitted PTX, with the flags Triton itself uses.

Budgets are the measured counts (triton 3.9.0) plus headroom; a kernel change that crosses one
should be a conscious decision (register pressure -> occupancy), and any spill fails.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KERNELS = ROOT / "kernels"
ARCHS = (80, 90)

# kernel -> register budget per thread. Measured max over fp32/bf16 (sm_80 / sm_90, triton 3.9.0):
# verify_rows 40/54, verify_scan 60/64, verify_residual 104/102, draft 128/92,
# combine 48/84 (4 experts + partial sum; 2 experts: 40/45); top_p < 1 (NUCLEUS, BLOCK_S = 256):
# verify_rows_nucleus 48/57, verify_residual_nucleus 98/87, draft_nucleus 94/92. All 0 spills.
# kernels/philox.py's fill (4 warps, BLOCK 1024): philox_fill 48/56, philox_fill_normal 96/96.
# kernels/tabdiff.py (4 warps, 512-cell tiles, float32 state, stream draws, no FMA contraction):
# tabdiff_churn 80/86, tabdiff_heun 92/82, tabdiff_observe 124/120, tabdiff_step (BLOCK_K 64, fp32 and
# bf16 logits) 80/80, tabdiff_step_wide (BLOCK_K 1024) 128/105. All 0 spills.
BUDGET = {"verify_rows": 72, "verify_scan": 96, "verify_residual": 136, "draft": 160, "combine": 112,
          "verify_rows_nucleus": 80, "verify_residual_nucleus": 128, "draft_nucleus": 128,
          "philox_fill": 64, "philox_fill_normal": 128,
          "tabdiff_churn": 112, "tabdiff_heun": 120, "tabdiff_observe": 160, "tabdiff_step": 112,
          "tabdiff_step_wide": 160}
# philox_fill_normal's float64 cos (libdevice) keeps a small local array for its slow argument
# reduction (huge arguments only; ours are in (0, 2 pi)): measured 0 / 24 bytes (sm_80 / sm_90)
SPILL_ALLOWANCE = {"philox_fill_normal": 24}

WORKER = r'''
import importlib.util, json, os, re, subprocess, sys, tempfile, time
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

package = importlib.util.spec_from_file_location("_diffkern_kernels_aot", os.path.join(sys.argv[1], "__init__.py"),
                                                 submodule_search_locations=[sys.argv[1]])
sys.modules[package.name] = importlib.util.module_from_spec(package)
package.loader.exec_module(sys.modules[package.name])
mod = importlib.import_module("_diffkern_kernels_aot.poe")
philox = importlib.import_module("_diffkern_kernels_aot.philox")
tabdiff = importlib.import_module("_diffkern_kernels_aot.tabdiff")
archs = [int(a) for a in sys.argv[2].split(",")]
dtypes = sys.argv[3].split(",")


def ints(names):
    return {n: "i32" for n in names.split()}


def cases(dt):
    p = "*" + dt
    for nucleus in (False, True):
        yield ("verify_rows" + ("_nucleus" if nucleus else ""), dt, mod._verify_rows_kernel,
               {"dlm_ptr": p, "ar_ptr": p, "drafts_ptr": "*i64", "temps_ptr": "*fp32", "stats_ptr": "*fp32",
                "flags_ptr": "*i32", "nkey_ptr": "*i64", "nval_ptr": "*fp64", **ints("R K W V dB dK dW aB aK aW"),
                "w": "fp32", "inv_t_star": "fp32", "top_p": "fp64", "NUCLEUS": "constexpr",
                "BLOCK_R": "constexpr", "BLOCK_V": "constexpr", "BLOCK_S": "constexpr"},
               {"NUCLEUS": nucleus, "BLOCK_R": 1, "BLOCK_V": 2048, "BLOCK_S": 256}, 8)
    yield ("verify_scan", dt, mod._verify_scan_kernel,
           {"stats_ptr": "*fp32", "u_ptr": "*fp64", "nacc_ptr": "*i64", "term_ptr": "*fp64", "BK": "i32",
            "W": "i32", "PARITY": "constexpr", "BLOCK_BK": "constexpr", "BLOCK_W": "constexpr"},
           {"PARITY": False, "BLOCK_BK": 64, "BLOCK_W": 16}, 4)
    for parity, nucleus in ((False, False), (True, False), (False, True)):
        yield ("verify_residual" + ("_nucleus" if nucleus else ""), dt, mod._verify_residual_kernel,
               {"dlm_ptr": p, "ar_ptr": p, "temps_ptr": "*fp32", "stats_ptr": "*fp32", "nkey_ptr": "*i64",
                "nval_ptr": "*fp64", "u_ptr": "*fp64", "nacc_ptr": "*i64", "tok_ptr": "*i64", "extra_ptr": "*fp64",
                **ints("BK K W V dB dK dW aB aK aW"), "w": "fp32", "inv_t_star": "fp32",
                "PARITY": "constexpr", "NUCLEUS": "constexpr", "BLOCK_R": "constexpr", "BLOCK_V": "constexpr"},
               {"PARITY": parity, "NUCLEUS": nucleus, "BLOCK_R": 1, "BLOCK_V": 2048}, 8)
    for nucleus in (False, True):
        yield ("draft" + ("_nucleus" if nucleus else ""), dt, mod._draft_kernel,
               {"logits_ptr": p, "temps_ptr": "*fp32", "u_ptr": "*fp64", "tok_ptr": "*i64", "logq_ptr": "*fp32",
                "flags_ptr": "*i32", **ints("R K W V sB sW"), "top_p": "fp64", "NUCLEUS": "constexpr",
                "BLOCK_R": "constexpr", "BLOCK_V": "constexpr", "BLOCK_S": "constexpr"},
               {"NUCLEUS": nucleus, "BLOCK_R": 1, "BLOCK_V": 2048, "BLOCK_S": 256}, 8)
    for num_e, has_part in ((2, False), (4, True)):
        yield ("combine", dt, mod._combine_kernel,
               {"p0": p, "p1": p, "p2": p, "p3": p, "part_ptr": "*fp32", "out_ptr": "*fp32",
                **ints("R V rs0 rs1 rs2 rs3"), **{f"w{i}": "fp32" for i in range(4)}, "inv_t": "fp32",
                "NUM_E": "constexpr", "HAS_PART": "constexpr", "FINAL": "constexpr",
                "BLOCK_R": "constexpr", "BLOCK_V": "constexpr"},
               {"NUM_E": num_e, "HAS_PART": has_part, "FINAL": True, "BLOCK_R": 1, "BLOCK_V": 2048}, 8)
    if dt == dtypes[0]:   # the shared Philox stream (kernels/philox.py): float64 output, any logits dtype
        for normal in (False, True):
            yield ("philox_fill" + ("_normal" if normal else ""), "fp64", philox._fill_kernel,
                   {"out_ptr": "*fp64", "seed": "i64", "offset": "i64", "tag": "i32", "total": "i64", "cols": "i32",
                    "row_start": "i64", "NORMAL": "constexpr", "BLOCK": "constexpr"},
                   {"NORMAL": normal, "BLOCK": 1024}, 4)
    yield from tabdiff_cases(dt)


def unit(names):
    return {n: "constexpr" for n in names.split()}, {n: 1 for n in names.split()}


def tabdiff_cases(dt):
    """kernels/tabdiff.py at its GPU tiles (tabdiff._tile: 512 cells, 4 warps), float32 state,
    float64 tables, contiguous columns (stride 1: what Triton specializes), stream draws (the
    heavier variant: Philox in-kernel), no FMA contraction (the launchers' enable_fp_fusion=False).
    The race at Adult's segments (K_max + 1 = 43: BLOCK_K 64, 8 rows) and at a wide one (BLOCK_K 1024,
    1 row) for each logits dtype; the other kernels once."""
    key = {"seed": "i64", "step": "i64", "row_start": "i64"}
    if dt == dtypes[0]:
        strides, ones = unit("xs1 cs1 ns1 us1")
        yield ("tabdiff_churn", "fp32", tabdiff._churn_kernel,
               {"x_ptr": "*fp32", "c_ptr": "*i64", "sc_ptr": "*fp64", "sh_ptr": "*fp64", "chance_ptr": "*fp64",
                "k_ptr": "*i32", "noise_ptr": "*fp32", "u_ptr": "*fp32", "xo_ptr": "*fp32", "co_ptr": "*i64",
                "status_ptr": "*i64", **ints("B n m xs0 cs0 ns0 us0"), **strides, **key,
                "GIVEN_NOISE": "constexpr", "GIVEN_UNIFORMS": "constexpr", "BLOCK_R": "constexpr",
                "BLOCK_C": "constexpr"},
               {**ones, "GIVEN_NOISE": False, "GIVEN_UNIFORMS": False, "BLOCK_R": 64, "BLOCK_C": 8}, 4)
        strides, ones = unit("hs1 xs1 ds1 gs1")
        yield ("tabdiff_heun", "fp32", tabdiff._heun_kernel,
               {"xh_ptr": "*fp32", "xn_ptr": "*fp32", "dn_ptr": "*fp32", "d_ptr": "*fp32", "sh_ptr": "*fp64",
                "sn_ptr": "*fp64", "out_ptr": "*fp32", "status_ptr": "*i64", **ints("B n hs0 xs0 ds0 gs0"),
                **strides, "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"},
               {**ones, "BLOCK_R": 64, "BLOCK_C": 8}, 4)
        strides, ones = unit("zs1 zcs1 os1 ocs1 nms1 cms1 ns1 us1")
        yield ("tabdiff_observe", "fp32", tabdiff._observe_kernel,
               {"z_ptr": "*fp32", "zc_ptr": "*i64", "xo_ptr": "*fp32", "xc_ptr": "*i64", "nmiss_ptr": "*u8",
                "cmiss_ptr": "*u8", "sn_ptr": "*fp64", "chance_ptr": "*fp64", "k_ptr": "*i32", "noise_ptr": "*fp32",
                "u_ptr": "*fp32", "on_ptr": "*fp32", "oc_ptr": "*i64", "status_ptr": "*i64",
                **ints("B n m zs0 zcs0 os0 ocs0 nms0 cms0 ns0 us0"), **strides, **key,
                "GIVEN_NOISE": "constexpr", "GIVEN_UNIFORMS": "constexpr", "BLOCK_R": "constexpr",
                "BLOCK_C": "constexpr"},
               {**ones, "GIVEN_NOISE": False, "GIVEN_UNIFORMS": False, "BLOCK_R": 64, "BLOCK_C": 8}, 4)
    strides, ones = unit("xs1 cs1 ds1 ls1 us1")
    for name, block_r, block_k in (("tabdiff_step", 8, 64), ("tabdiff_step_wide", 1, 1024)):
        yield (name, dt, tabdiff._step_kernel,
               {"x_ptr": "*fp32", "c_ptr": "*i64", "den_ptr": "*fp32", "lg_ptr": "*" + dt, "sh_ptr": "*fp64",
                "sn_ptr": "*fp64", "k_ptr": "*i32", "off_ptr": "*i32", "at_ptr": "*fp64", "as_ptr": "*fp64",
                "u_ptr": "*fp32", "xo_ptr": "*fp32", "co_ptr": "*i64", "d_ptr": "*fp32", "status_ptr": "*i64",
                **ints("B n m xs0 cs0 ds0 ls0 us0"), **strides, **key, "GIVEN_UNIFORMS": "constexpr",
                "BLOCK_R": "constexpr", "BLOCK_C": "constexpr", "BLOCK_K": "constexpr"},
               {**ones, "GIVEN_UNIFORMS": False, "BLOCK_R": block_r, "BLOCK_C": 8, "BLOCK_K": block_k}, 4)


def usage(ptx, arch):
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        res = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", src,
                              "-o", os.path.join(d, "k.o")], capture_output=True, text=True, check=True)
    log = res.stdout + res.stderr
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return max(regs), sum(spills), os.path.basename(get_ptxas(arch).path)


out = []
for dt in dtypes:
    for name, dtype, fn, sig, cx, nw in cases(dt):
        for arch in archs:
            t0 = time.time()
            rec = dict(kernel=name, dtype=dtype, arch=arch, constexprs={k: str(v) for k, v in cx.items()},
                       num_warps=nw)
            try:
                options = {"num_warps": nw}
                if name.startswith("tabdiff"):
                    options["enable_fp_fusion"] = False   # as kernels/tabdiff.py launches them
                c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx),
                                   target=GPUTarget("cuda", arch, 32), options=options)
                rec["secs"] = round(time.time() - t0, 2)
                rec["asm"] = sorted(c.asm)
                rec["cubin_bytes"] = len(c.asm.get("cubin", b""))
                rec["n_regs"], rec["n_spills"], rec["ptxas"] = usage(c.asm["ptx"], arch)
                rec["ok"] = True
            except Exception as exc:  # reported, judged by the test
                rec["ok"] = False
                rec["error"] = f"{type(exc).__name__}: {str(exc)[:1500]}"
            out.append(rec)
print("AOT_JSON " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def aot_results(tmp_path_factory):
    pytest.importorskip("triton")
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"triton has no NVIDIA backend here ({exc})")
    script = tmp_path_factory.mktemp("aot") / "aot_worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))   # a real compile each run
    proc = subprocess.run([sys.executable, str(script), str(KERNELS), ",".join(map(str, ARCHS)), "fp32,bf16"],
                          capture_output=True, text=True, env=env, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("AOT_JSON ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"AOT worker failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("AOT_JSON "):])


def test_every_kernel_compiles_for_sm80_and_sm90(aot_results):
    failed = [r for r in aot_results if not r["ok"]]
    assert not failed, "\n".join(f"{r['kernel']}[{r['dtype']}] sm_{r['arch']}: {r['error']}" for r in failed)
    seen = {(r["kernel"], r["arch"]) for r in aot_results}
    assert seen == {(k, a) for k in BUDGET for a in ARCHS}
    for r in aot_results:
        assert {"ptx", "cubin"} <= set(r["asm"]) and r["cubin_bytes"] > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_registers_and_spills(aot_results, arch):
    rows = [r for r in aot_results if r["ok"] and r["arch"] == arch]
    assert rows
    report = "\n".join(f"  {r['kernel']}[{r['dtype']}] {r['constexprs']} warps={r['num_warps']}: "
                       f"{r['n_regs']} regs, {r['n_spills']} spill bytes ({r['ptxas']}, {r['secs']} s)"
                       for r in rows)
    print(f"\nsm_{arch}:\n{report}")
    for r in rows:
        assert r["n_spills"] <= SPILL_ALLOWANCE.get(r["kernel"], 0), f"{r['kernel']}[{r['dtype']}] sm_{arch} spills:\n{report}"
        assert r["n_regs"] <= BUDGET[r["kernel"]], f"{r['kernel']}[{r['dtype']}] sm_{arch} over budget:\n{report}"
