"""Equal-FLOPs study (baseline vs TST arms): the same as `megatron-tst study`.

    python benchmarks/equal_flops_study.py configs/demo-cpu.yaml --out runs/study-demo \
        --bag-sizes 2 4 --ratios 0.2 0.4 --seeds 1 2 3 --jobs 2
"""

import sys

from megatron_tst.cli import main

if __name__ == "__main__":
    sys.exit(main(["study", *sys.argv[1:]]))
