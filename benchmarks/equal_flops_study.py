"""Equal-FLOPs study (baseline vs TST arms): the same as `megatron-tst study`.

    python benchmarks/equal_flops_study.py configs/demo-cpu.yaml --out runs/study-demo \
        --bag-sizes 2 4 --ratios 0.2 0.4 --seeds 1 2 3 --jobs 2
"""

import argparse
import sys

from megatron_tst.config.errors import InputError
from megatron_tst.study import add_study_arguments, run_study


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-tst study")
    add_study_arguments(parser)
    args, extra = parser.parse_known_args(argv)
    # Dotted overrides may also follow the options (argparse stops matching positionals there).
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = [*args.overrides, *extra]
    try:
        return run_study(args)
    except InputError as err:  # a bad recipe or data: one paragraph, exit status 2, as the CLI
        print(f"megatron-tst: {err.kind}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
