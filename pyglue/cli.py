"""The ``diffkern`` command: ``info``, ``bench``, ``demo <method>``, ``tabdiff fit|sample|impute|evaluate``."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys

DEMOS = {"spectrum": "diffkern.spectrum.demo", "poe-bridge": "diffkern.poe_bridge.demo",
         "tabdiff": "diffkern.tabdiff.demo"}

BENCH_EPILOG = """\
what a run needs (peak RSS measured on a shared 2-core, 24 GiB CPU machine; see BENCHMARKS.md):
  full run   5.2 GB of memory and 7-16 min, mostly the slow plain-torch baselines
             (float64 reference, eager softmaxes over [K, W, V]) on the full-size shapes
  --quick    0.75 GB and about 30 s: small shapes, no torch.compile rows
  the tabdiff suite's whole-sample rows run one 32,561-row sample() per backend, each in a
  fresh process (a few minutes each; --quick: 500 rows, 5 steps)

devices: --device cpu times the cpu backend with the host clock against the streaming-read
probe; --device cuda times the cuda and triton backends (and torch.compile of the reference)
with CUDA events against a device-to-device copy measured in the same run. The CUDA path has
not run on a GPU yet (none where it was written); scripts/gpu_check.sh runs it on one.

comparing runs: --compare BASE.json runs the bench and compares it with BASE; --compare
BASE.json NEW.json compares two reports without running anything. A row moved only when the
repeat spans [min, max] of the two runs do not overlap; --fail-ratio 1.5 exits 1 if a row is
more than 1.5x slower beyond that noise.
"""


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    wanted = ["sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16"]
                    return " ".join(w for w in wanted if w in flags)
    except OSError:
        pass
    return platform.processor() or "unknown"


def cmd_info(args) -> int:
    import torch

    import diffkern
    from diffkern import _extension

    print(f"diffkern {diffkern.__version__}   python {platform.python_version()}   torch {torch.__version__}")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton not installed")
    print(f"CPU: {torch.get_num_threads()} threads; features: {_cpu_features()}")
    print(f"CUDA device visible: {torch.cuda.is_available()}")
    ok, why = _extension.load()
    print(f"diffkern._C: {why}")
    if ok:
        info = _extension.build_info()
        print(f"  built with: torch {info.get('torch')}, {info.get('compiler', '?')}, OpenMP={info.get('openmp')}, "
              f"CUDA kernels={'yes' if info.get('cuda') else 'no'}, CPU path={info.get('runtime_isa')}")
    print("backends:")
    for name, status in diffkern.backends().items():
        print(f"  {name:10s} {'available  ' if status.available else 'unavailable'}  {status.reason}")
    return 0


def cmd_bench(args) -> int:
    from diffkern.bench import compare, devices, report

    if args.compare and len(args.compare) > 2:
        return _fail("--compare takes BASE.json [NEW.json]")
    if args.fail_ratio is not None and not args.compare:
        return _fail("--fail-ratio needs --compare")
    try:
        base = report.read_json(args.compare[0]) if args.compare else None   # before a long run
        if args.compare and len(args.compare) == 2:      # two reports: compare only, run nothing
            new, new_path = report.read_json(args.compare[1]), args.compare[1]
        else:
            new, new_path = _run_bench(args), args.json
    except (ValueError, devices.DeviceUnavailable) as exc:
        return _fail(str(exc))
    if base is None:
        return 0
    text, status = compare.run_compare(base, new, args.compare[0], new_path, args.fail_ratio)
    print(text, file=sys.stderr if status == 2 else sys.stdout)
    return status


def _fail(message: str) -> int:
    print(f"diffkern bench: {message}", file=sys.stderr)
    return 2


def _run_bench(args) -> dict:
    import torch

    from diffkern.bench import SUITES, devices, harness, plot, report, suite_plan

    if args.threads:
        torch.set_num_threads(args.threads)
    device = devices.bench_device(args.device)
    plans = [p for suite in args.suite or sorted(SUITES) for p in suite_plan(suite, args.quick, args.device)]
    result = harness.run(plans, quick=args.quick, device=device, progress=not args.no_progress,
                         budget_s=args.budget_s)
    print(report.format_table(result))
    report.write_json(result, args.json)
    print(f"wrote {args.json}")
    if args.png:
        problem = plot.write_plot(result, args.png)
        print(problem or f"wrote {args.png}")
    return result


def cmd_demo(args) -> int:
    return args.demo_run(args)


def build_parser() -> argparse.ArgumentParser:
    from diffkern.bench import SUITES
    from diffkern.bench.devices import DEVICES

    parser = argparse.ArgumentParser(prog="diffkern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, backends (and why not), CPU features, build flags")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="time every operator x backend; prints a table, writes JSON and a PNG",
                       description="Time every operator x backend; print a table, write JSON and a PNG.",
                       epilog=BENCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small shapes, no torch.compile rows: a run of seconds, under 1 GB")
    p.add_argument("--suite", action="append", choices=sorted(SUITES),
                   help="run only this suite (repeatable); default: all")
    p.add_argument("--device", default="cpu", choices=sorted(DEVICES),
                   help="where to time: cpu (default) or cuda (every backend available on the GPU)")
    p.add_argument("--compare", nargs="+", metavar="JSON",
                   help="BASE.json [NEW.json]: ratio of medians per matching row, moved beyond noise or not")
    p.add_argument("--fail-ratio", type=float, metavar="R",
                   help="with --compare: exit 1 if a row is more than R times slower beyond noise")
    p.add_argument("--budget-s", type=float, metavar="S",
                   help="start no new case after S seconds; the rest are reported as skipped")
    p.add_argument("--json", default="diffkern-bench.json", help="where to write the JSON report")
    p.add_argument("--png", default="diffkern-bench.png",
                   help="where to write the speed-up plot ('' to skip; default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch/OpenMP threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="end-to-end demo of a method")
    demos = p.add_subparsers(dest="method", required=True)
    for name, module in DEMOS.items():
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            d = demos.add_parser(name, help=f"unavailable: {exc}")
            d.set_defaults(func=lambda a, exc=exc: sys.exit(f"diffkern demo: {exc}"))
            continue
        d = demos.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else None)
        mod.add_arguments(d)
        d.set_defaults(func=cmd_demo, demo_run=mod.run)

    try:
        from .tabdiff.cli import add_parser as add_tabdiff_parser
    except ImportError as exc:          # pandas is the tabdiff extra's
        p = sub.add_parser("tabdiff", help=f"unavailable: {exc}")
        p.set_defaults(func=lambda a, exc=exc: sys.exit(f'diffkern tabdiff: {exc}; pip install "diffkern[tabdiff]"'))
    else:
        add_tabdiff_parser(sub)
    return parser


def main(argv=None) -> int:
    from ._optional import MissingDependency

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MissingDependency as exc:   # one line naming the extra, not a traceback
        command = " ".join(filter(None, (args.command, getattr(args, "method", None))))
        raise SystemExit(f"diffkern {command}: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())
