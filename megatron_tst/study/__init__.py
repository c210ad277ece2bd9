"""Equal-FLOPs study: a baseline arm and TST arms, several seeds, one or several run lengths.

Every run is the real trainer (``megatron-tst train``) on one base recipe, with the same steps,
batch of latent positions, model and schedule; only the ``tst.*`` keys differ between arms (and
the seed between repeats). The learning rate is chosen on the baseline (``--lrs``, at the
shortest length or ``--lr-steps``). Each run keeps its final checkpoint, and its final loss is
measured by ``megatron-tst eval`` on the same held-out windows for every arm and seed: the whole
validation set, or its first ``--eval-tokens`` tokens.

    megatron-tst study configs/demo-cpu.yaml --out runs/study-demo --bag-sizes 2 4 \\
        --ratios 0.2 0.4 --seeds 1 2 3 --jobs 2
    megatron-tst study RECIPE --out DIR --arms s=2,r=0.3 s=3,r=0.3 --steps 1500 3000

Writes ``<out>/study.json`` (every run's records and the statistics), ``<out>/report.md`` and
two plots. Runs already finished under ``<out>/runs`` are reused, so an interrupted study
continues where it stopped; the report covers every finished run of the directory made with the
same recipe and overrides, so a second invocation with other arms or seeds adds to it.
"""

from .cli import add_study_arguments, run_study
from .runs import BASELINE, arm_name
from .stats import analyze, first_step_reaching, paired_p_value

__all__ = ["BASELINE", "add_study_arguments", "analyze", "arm_name", "first_step_reaching",
           "paired_p_value", "run_study"]
