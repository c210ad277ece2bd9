"""The equal-FLOPs study harness at smoke size: two arms through the real trainer."""

import json

import pytest

from megatron_tst.study import first_step_reaching, paired_p_value
from tests.conftest import run_cli


@pytest.mark.newest_line
def test_study_smoke(tiny_recipe, tmp_path):
    out = tmp_path / "study"
    res = run_cli(["study", str(tiny_recipe), "--out", str(out), "--bag-sizes", "2",
                   "--ratios", "0.5", "--seeds", "1", "2", "--jobs", "2", "--eval-points", "2",
                   "training.train_steps=4", "schedule.warmup_steps=1"], timeout=600)
    report = (out / "report.md").read_text()
    assert "| baseline |" in report and "| tst-s2-r0.5 |" in report
    assert "report.md" in res.stdout
    study = json.loads((out / "study.json").read_text())
    assert {r["arm"] for r in study["runs"]} == {"baseline", "tst-s2-r0.5"}
    assert len(study["runs"]) == 4  # 2 arms x 2 seeds
    for run in study["runs"]:  # validation: next-token loss, with cumulative FLOPs
        assert run["valid"][-1]["step"] == 4 and run["valid"][-1]["flops"] > 0
    rows = {r["arm"]: r for r in study["summary"]}
    assert rows["tst-s2-r0.5"]["data_tokens"] == (2 * 2 + 2) * 4 * 32  # s times more in phase 1
    assert rows["baseline"]["data_tokens"] == 4 * 4 * 32
    assert rows["tst-s2-r0.5"]["switch_step"] == 2
    assert rows["tst-s2-r0.5"]["p_value"] is not None
    assert (out / "loss_vs_flops.png").stat().st_size > 10_000
    # a second invocation reuses the finished runs
    again = run_cli(["study", str(tiny_recipe), "--out", str(out), "--bag-sizes", "2",
                     "--ratios", "0.5", "--seeds", "1", "2", "--eval-points", "2",
                     "training.train_steps=4", "schedule.warmup_steps=1"], timeout=120)
    assert (out / "report.md").read_text() == report and "report.md" in again.stdout


def test_iso_loss_interpolation_and_t_test():
    curve = [(10, 5.0), (20, 4.0), (30, 3.0)]
    assert first_step_reaching(curve, 4.5) == pytest.approx(15.0)
    assert first_step_reaching(curve, 5.5) == 10.0
    assert first_step_reaching(curve, 2.0) is None
    assert paired_p_value([1.0], [2.0]) is None
    assert paired_p_value([3.0, 3.1, 2.9], [3.5, 3.6, 3.5]) < 0.01
