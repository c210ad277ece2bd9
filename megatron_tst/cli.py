"""``megatron-tst``: train | demo | preprocess | study | inspect | export | import | eval.

Single process: ``megatron-tst train configs/x.yaml key=value ...``. Several processes:
``torchrun --nproc-per-node N -m megatron_tst.cli train configs/x.yaml ...``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron_tst.config import ConfigError, load_config
from megatron_tst.config.errors import InputError

RECIPES = Path(__file__).resolve().parent.parent / "configs"
DEMO_RECIPE = RECIPES / "demo-cpu.yaml"
VERBOSE_HELP = ("also show on the terminal what goes only to <run_dir>/logs/rank<N>.log: "
                "megatron-core's and the other libraries' output, their warnings, the resolved "
                "config")


def _cmd_train(args) -> int:
    # The console (training/console.py) comes first, before megatron-core and torch are imported
    # (they warn at import): library output goes to the run's log file, kept in memory until the
    # run may write its directory; --verbose shows it on the terminal as well.
    from megatron_tst.training.console import capture

    with capture(verbose=getattr(args, "verbose", False)):
        return _train(args)


def _train(args) -> int:
    import os

    # Bad recipes and bad data fail here, in about a second: before megatron-core is imported and
    # before any process group exists (every rank runs the same checks on the same files).
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    cfg = load_config(args.config, args.overrides, world_size=world_size)
    from megatron_tst.data.build import check_run_data
    from megatron_tst.plan import RunPlan

    plan = RunPlan.build(cfg, world_size)
    plan.fusions  # refuses GPU-only settings (FP8, fusions) on a machine that cannot run them
    check_run_data(cfg, plan.stream)
    if cfg.evaluation.downstream.interval:
        from megatron_tst.training.downstream import check as check_downstream

        check_downstream(cfg)
    if cfg.checkpoint.load not in ("auto", "none"):  # a path: it must be a checkpoint, now
        from megatron_tst.training.saved import find_checkpoint

        find_checkpoint(cfg.checkpoint.load, key="checkpoint.load")

    from megatron_tst.training.distributed import destroy_distributed
    from megatron_tst.training.faults import EXIT_NONFINITE
    from megatron_tst.training.signals import EXIT_PREEMPTED, FAILED, PREEMPTED
    from megatron_tst.training.trainer import train

    from megatron_tst.export import init_from
    from megatron_tst.training.checkpoint import SaveError

    try:
        result = train(cfg, plan, initializer=init_from if cfg.checkpoint.init_from else None)
    except SaveError as err:  # the run stops; its previous checkpoint is intact
        print(f"megatron-tst: save error: {err}", file=sys.stderr)
        return 1
    finally:
        destroy_distributed()
    _print_summary(cfg, result)
    return {PREEMPTED: EXIT_PREEMPTED, FAILED: EXIT_NONFINITE}.get(result.status, 0)


def _cmd_demo(args) -> int:
    recipe = Path(args.config) if args.config else DEMO_RECIPE
    if not recipe.is_file():
        raise ConfigError(f"the demo recipe {recipe} is missing; run from a source checkout "
                          f"(pip install -e '.[demo]') or pass --config PATH")
    args.config = str(recipe)
    return _cmd_train(args)


def _print_summary(cfg, result) -> None:
    import os

    if int(os.environ.get("RANK", 0)) != int(os.environ.get("WORLD_SIZE", 1)) - 1:
        return
    how = {"preempted": f"stopped by {result.signal or 'its time limit'}",
           "stopped": "stopped (exit_at_step)", "failed": "stopped on a non-finite loss"}
    print(f"\nrun '{cfg.name}' {how.get(result.status, 'finished')} at step {result.step} "
          f"in {result.wall_time_s:.1f} s")
    if result.train_loss is not None:
        print(f"  final training loss   {result.train_loss:.4f}")
    if result.valid_loss is not None:
        print(f"  final validation loss {result.valid_loss:.4f}")
    print(f"  data tokens consumed  {result.consumed_tokens:,}")
    if result.skipped_steps:
        print(f"  skipped steps         {result.skipped_steps:,} (non-finite loss or gradients; "
              f"training.nonfinite=skip)")
    print(f"  checkpoint            {result.checkpoint}")
    print(f"  metrics               {Path(cfg.resolved_run_dir) / 'metrics.jsonl'}")


def _cmd_preprocess(args) -> int:
    from megatron_tst.data.preprocess import run_preprocess

    return run_preprocess(args)


def _cmd_study(args) -> int:
    from megatron_tst.study import run_study

    return run_study(args)


def _cmd_inspect(args) -> int:
    from megatron_tst.inspect import run_inspect

    return run_inspect(args)


def _cmd_export(args) -> int:
    from megatron_tst.export.hf import run_export

    return run_export(args)


def _cmd_import(args) -> int:
    from megatron_tst.export.hf_import import run_import

    return run_import(args)


def _cmd_eval(args) -> int:
    from megatron_tst.evaluate import run_eval

    return run_eval(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-tst", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train from a YAML recipe")
    p.add_argument("config", help="YAML recipe, e.g. configs/demo-cpu.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=1e-3")
    p.add_argument("--verbose", "-v", action="store_true", help=VERBOSE_HELP)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("demo", help="train the tiny recipe on the bundled English corpus (CPU)")
    p.add_argument("--config", default=None, help=f"recipe (default {DEMO_RECIPE.name})")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.train_steps=50")
    p.add_argument("--verbose", "-v", action="store_true", help=VERBOSE_HELP)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("preprocess", help="tokenize text/JSONL into megatron indexed datasets")
    from megatron_tst.data.preprocess import add_preprocess_arguments

    add_preprocess_arguments(p)
    p.set_defaults(func=_cmd_preprocess)

    p = sub.add_parser("study", help="equal-FLOPs study: baseline vs TST arms over s, r, seeds")
    from megatron_tst.study import add_study_arguments

    add_study_arguments(p)
    p.set_defaults(func=_cmd_study)

    p = sub.add_parser("inspect", help="a recipe's sizes (parameters, FLOPs, tokens, memory) "
                                       "or a checkpoint's train state and run config")
    from megatron_tst.inspect import add_inspect_arguments

    add_inspect_arguments(p)
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("export", help="a checkpoint (any layout) as a Hugging Face model "
                                      "directory: config, safetensors, tokenizer")
    from megatron_tst.export.arguments import add_export_arguments

    add_export_arguments(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("import", help="a Hugging Face model directory as a checkpoint that "
                                      "any layout loads (train from it: checkpoint.init_from)")
    from megatron_tst.export.arguments import add_import_arguments

    add_import_arguments(p)
    p.set_defaults(func=_cmd_import)

    p = sub.add_parser("eval", help="next-token loss, perplexity and bits per byte of a "
                                    "checkpoint on held-out data (any layout)")
    from megatron_tst.export.arguments import add_eval_arguments

    add_eval_arguments(p)
    p.set_defaults(func=_cmd_eval)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Dotted overrides may also follow the options (argparse stops matching positionals there).
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except InputError as err:  # ConfigError, DataError: one paragraph, no traceback
        print(f"megatron-tst: {err.kind}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
