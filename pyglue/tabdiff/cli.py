"""``diffkern tabdiff fit|sample|impute|evaluate``: TabDiff on CSV files.

``fit``, ``sample`` and ``impute`` take ``--nproc N`` (N local processes, gloo) or run under
``torchrun --nproc_per_node=N -m diffkern.tabdiff ...``; either way one model / one CSV is
written, by rank 0."""

from __future__ import annotations

import argparse
import json
import sys


def _read_csv(path: str, parse_dates: str = ""):
    import pandas as pd

    columns = [c for c in parse_dates.split(",") if c]
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise SystemExit(f"diffkern tabdiff: no such file: {path}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise SystemExit(f"diffkern tabdiff: --parse-dates: {missing} are not columns of {path}")
    for column in columns:
        frame[column] = pd.to_datetime(frame[column])
    return frame


def _json_arg(text: str, name: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"diffkern tabdiff: {name}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise SystemExit(f"diffkern tabdiff: {name}: expected a JSON object")
    return value


def _condition_value(synth, column: str, text: str):
    """A ``column=value`` string as the column's own type (a level of a categorical, a number, a date)."""
    import pandas as pd

    names = [s.name for s in synth.schema]
    if column not in names:
        raise SystemExit(f"diffkern tabdiff: --condition: unknown column {column!r} (columns: {names})")
    spec = synth.transform.spec(column)
    if text in ("", "NaN", "nan", "None"):
        return None
    if spec.kind == "numerical":
        try:
            return float(text)
        except ValueError:
            raise SystemExit(f"diffkern tabdiff: --condition: column {column!r} is numerical, got {text!r}") from None
    if spec.kind == "datetime":
        return pd.Timestamp(text)
    for level in synth.transform.levels(spec):
        if str(level) == text:
            return level
    return text          # the synthesizer names the column and its levels


def _primary() -> bool:
    """True where output is written: a single process, or rank 0 under torchrun."""
    from .distributed import world

    return world()[0] == 0


def cmd_fit(args) -> int:
    from . import TabDiffConfig, TabDiffSynthesizer

    frame = _read_csv(args.data, args.parse_dates)
    config = TabDiffConfig(**_json_arg(args.config, "--config"))
    synth = TabDiffSynthesizer(config, schema=_json_arg(args.schema, "--schema"))
    synth.fit(frame, target=args.target, epochs=args.epochs, seed=args.seed,
              checkpoint_dir=args.checkpoint_dir, resume=args.resume, nproc=args.nproc)
    if _primary():
        synth.save(args.output)
        print(f"fitted {synth!r} in {synth.train_seconds:.0f} s; wrote {args.output}")
    return 0


def cmd_sample(args) -> int:
    from . import TabDiffSynthesizer

    synth = TabDiffSynthesizer.load(args.model)
    conditions = {}
    for item in args.condition or []:
        column, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"diffkern tabdiff: --condition: expected COLUMN=VALUE, got {item!r}")
        conditions[column] = _condition_value(synth, column, value)
    frame = synth.sample(args.num_rows, seed=args.seed, batch_size=args.batch_size, steps=args.steps,
                         conditions=conditions or None, guidance=args.guidance, nproc=args.nproc)
    if _primary():
        frame.to_csv(args.output, index=False)
        print(f"wrote {len(frame)} rows to {args.output}")
    return 0


def cmd_impute(args) -> int:
    from . import TabDiffSynthesizer

    synth = TabDiffSynthesizer.load(args.model)
    dates = ",".join(s.name for s in synth.schema if s.kind == "datetime")
    frame = _read_csv(args.data, dates)
    filled = synth.impute(frame, seed=args.seed, batch_size=args.batch_size, steps=args.steps, guidance=args.guidance,
                          nproc=args.nproc)
    if _primary():
        filled.to_csv(args.output, index=False)
        print(f"filled {int(frame.isna().sum().sum())} cells; wrote {args.output}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import METRICS, evaluate

    metrics = [m for m in args.metrics.split(",") if m] if args.metrics else list(METRICS)
    train = _read_csv(args.real, args.parse_dates)
    synthetic = _read_csv(args.synthetic, args.parse_dates)
    test = _read_csv(args.test, args.parse_dates) if args.test else None
    scores = evaluate(train, synthetic, test, target=args.target, metrics=metrics, seed=args.seed)
    for key, value in scores.items():
        print(f"{key:20s} {value:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(scores, f, indent=1)
    return 0


def _add_nproc(parser, what: str) -> None:
    parser.add_argument("--nproc", type=int, default=None, metavar="N",
                        help=f"{what}; under torchrun leave it out (torchrun --nproc_per_node=N -m diffkern.tabdiff ...)")


def _in_process_group(command):
    """``command``, run inside the process group torchrun describes when launched by torchrun."""
    def run(args) -> int:
        from .distributed import init_from_environment

        if not init_from_environment():
            return command(args)
        import torch.distributed

        try:
            return command(args)
        finally:
            torch.distributed.destroy_process_group()
    return run


def add_parser(sub) -> None:
    p = sub.add_parser("tabdiff", help="TabDiff on CSV files: fit, sample, impute, evaluate",
                       description="TabDiff on CSV files. Models are single .tabdiff (safetensors) files.")
    verbs = p.add_subparsers(dest="verb", required=True)

    f = verbs.add_parser("fit", help="learn a CSV table; write a model file")
    f.add_argument("data", help="training CSV")
    f.add_argument("-o", "--output", required=True, help="model file to write (e.g. model.tabdiff)")
    f.add_argument("--target", help="column to train classifier-free guidance for (imputation, conditions)")
    f.add_argument("--epochs", type=int, default=None, help="default: the config's (300)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--config", default="{}", help='JSON TabDiffConfig overrides, e.g. \'{"dim_t": 512}\'')
    f.add_argument("--schema", default="{}", help='JSON column kinds, e.g. \'{"zip": "categorical", "uid": "id"}\'')
    f.add_argument("--parse-dates", default="", help="comma-separated datetime columns")
    f.add_argument("--checkpoint-dir", default=None, help="periodic checkpoints (and one on Ctrl-C) go here")
    f.add_argument("--resume", default=None, help="continue from this checkpoint dir")
    _add_nproc(f, "train with DDP on N local processes, each on a slice of every batch")
    f.set_defaults(func=_in_process_group(cmd_fit))

    s = verbs.add_parser("sample", help="draw synthetic rows into a CSV")
    s.add_argument("model")
    s.add_argument("-n", "--num-rows", type=int, required=True)
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--guidance", type=float, default=None)
    s.add_argument("--condition", action="append", metavar="COLUMN=VALUE",
                   help="fix a column in every row (repeatable; VALUE NaN asks for a missing value)")
    _add_nproc(s, "share whole batches of rows among N local processes (the same table)")
    s.set_defaults(func=_in_process_group(cmd_sample))

    i = verbs.add_parser("impute", help="fill the empty cells of a CSV")
    i.add_argument("model")
    i.add_argument("data")
    i.add_argument("-o", "--output", required=True)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--steps", type=int, default=None)
    i.add_argument("--batch-size", type=int, default=None)
    i.add_argument("--guidance", type=float, default=None)
    _add_nproc(i, "share whole batches of rows among N local processes (the same table)")
    i.set_defaults(func=_in_process_group(cmd_impute))

    e = verbs.add_parser("evaluate", help="score a synthetic CSV against the real one(s)")
    e.add_argument("real", help="the training CSV")
    e.add_argument("synthetic")
    e.add_argument("--test", help="held-out real CSV (reference of the fidelity metrics, DCR, MLE)")
    e.add_argument("--target", help="column MLE predicts")
    e.add_argument("--metrics", default="", help="comma-separated subset (default: all)")
    e.add_argument("--parse-dates", default="")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", default=None)
    e.set_defaults(func=cmd_evaluate)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffkern.tabdiff")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["tabdiff", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
