"""The study's statistics on synthetic runs whose answers are worked out by hand here."""

import math

import pytest

from megatron_tst.study import analyze, first_step_reaching, paired_p_value
from megatron_tst.study.stats import crossover, frontier_speedup, interval

T3 = 3.182446305284263  # Student t, 97.5% quantile, 3 degrees of freedom (a printed table's)
FLOPS_PER_STEP = 1e9


def record(arm, seed, steps, final, curve=None):
    """A run record as ``study.json`` holds it; ``curve``: [(step, loss)] of its validation."""
    curve = curve or [(steps, final)]
    return {"arm": arm, "seed": seed, "steps": steps, "flops_per_step": FLOPS_PER_STEP,
            "final_loss": final, "eval_tokens": 1000, "data_tokens": steps * 100,
            "switch_step": None if arm == "baseline" else steps // 3,
            "valid": [{"step": s, "loss": v, "flops": s * FLOPS_PER_STEP} for s, v in curve],
            "phase1_tokens_per_s": None if arm == "baseline" else 200.0,
            "tokens_per_s": 100.0}


def study(base: dict, gaps: dict) -> list[dict]:
    """4 seeds per length: baseline losses ``base[steps] + offset``, the arm's ``gap[seed]``
    above its baseline seed."""
    offsets = [0.02, -0.01, 0.01, -0.02]
    runs = []
    for steps, level in base.items():
        for seed, off in enumerate(offsets, 1):
            runs.append(record("baseline", seed, steps, level + off))
            runs.append(record("tst-s2-r0.3", seed, steps, level + off + gaps[steps][seed - 1]))
    return runs


def test_intervals_and_p_values_by_hand():
    xs = [1.0, 2.0, 3.0, 4.0]  # mean 2.5, sd sqrt(5/3)
    ci = interval(xs)
    half = T3 * math.sqrt(5 / 3) / 2
    assert ci["mean"] == 2.5 and ci["sd"] == pytest.approx(math.sqrt(5 / 3))
    assert (ci["lo"], ci["hi"]) == (pytest.approx(2.5 - half), pytest.approx(2.5 + half))
    assert interval([3.0]) == {"n": 1, "mean": 3.0, "sd": 0.0, "lo": None, "hi": None}
    # paired: differences -0.5, -0.5, -0.4 -> t = -0.4667 / (0.0577 / sqrt 3) = -14.0, df 2
    assert paired_p_value([3.0, 3.1, 3.1], [3.5, 3.6, 3.5]) == pytest.approx(0.00506, rel=1e-2)
    assert paired_p_value([1.0], [2.0]) is None


def test_iso_loss_interpolation():
    curve = [(10, 5.0), (20, 4.0), (30, 3.0)]
    assert first_step_reaching(curve, 4.5) == pytest.approx(15.0)
    assert first_step_reaching(curve, 5.5) == 10.0
    assert first_step_reaching(curve, 2.0) is None


def test_a_sweep_with_a_crossover():
    # gap +0.10 at 1000 steps, -0.10 at 4000 (the same for every seed but for the spread below)
    spread = [0.01, -0.01, 0.02, -0.02]  # sd of the differences: sqrt(0.001/3)
    gaps = {1000: [0.10 + e for e in spread], 4000: [-0.10 + e for e in spread]}
    out = analyze(study({1000: 4.0, 4000: 3.6}, gaps), train_tokens=10**6)
    rows = {r["arm"]: r for r in out["lengths"][1000]}
    d = rows["tst-s2-r0.3"]["diff"]
    half = T3 * math.sqrt(0.001 / 3) / 2
    assert d["mean"] == pytest.approx(0.10) and d["seeds"] == [1, 2, 3, 4]
    assert (d["lo"], d["hi"]) == (pytest.approx(0.10 - half), pytest.approx(0.10 + half))
    assert d["p"] < 0.01
    assert rows["baseline"]["final"]["mean"] == pytest.approx(4.0)
    assert rows["baseline"]["epochs"] == pytest.approx(0.1)
    assert rows["tst-s2-r0.3"]["phase1_tokens_per_s_ratio"] == pytest.approx(2.0)
    # the gap crosses zero halfway in log FLOPs: at sqrt(1e12 * 4e12) = 2e12
    c = out["compute"]["tst-s2-r0.3"]
    assert [p["steps"] for p in c["points"]] == [1000, 4000]
    x = c["crossover"]
    assert x["flops"] == pytest.approx(2e12)
    # the interval's bounds (gap -+ half) cross zero at log-fractions (0.1 -+ half) / 0.2
    lo_frac, hi_frac = (0.10 - half) / 0.20, (0.10 + half) / 0.20
    assert x["lo_flops"] == pytest.approx(1e12 * 4 ** lo_frac)
    assert x["hi_flops"] == pytest.approx(1e12 * 4 ** hi_frac)
    assert x["significance"] == (f"significantly behind below {1e12 * 4 ** lo_frac:.3g} FLOPs; "
                                 f"significantly ahead above {1e12 * 4 ** hi_frac:.3g} FLOPs")
    # across lengths: the arm's 4.1 at 1000 steps is worse than every baseline (bound); its 3.5
    # at 4000 better than every baseline (bound)
    assert rows["tst-s2-r0.3"]["speedup_frontier"] is None
    assert rows["tst-s2-r0.3"]["speedup_frontier_text"] == "< 1.00x"
    assert {r["arm"]: r for r in out["lengths"][4000]}["tst-s2-r0.3"][
        "speedup_frontier_text"] == "> 1.00x"


def test_speedup_across_lengths_interpolates_in_log_flops():
    base = [(1e12, 4.0), (4e12, 3.6)]
    value, text = frontier_speedup(base, 3.8, 1e12)  # halfway in loss: 2e12 FLOPs, at 1e12
    assert value == pytest.approx(2.0) and text == "2.00x"
    value, _ = frontier_speedup(base, 3.9, 4e12)  # a quarter: 1e12 * 4 ** 0.25, at 4e12
    assert value == pytest.approx(4 ** 0.25 / 4)
    assert frontier_speedup(base, 3.5, 4e12) == (None, "> 1.00x")
    assert frontier_speedup(base, 4.2, 1e12) == (None, "< 1.00x")
    assert frontier_speedup(base[:1], 3.9, 1e12) == (None, "-")


def test_no_crossover_within_the_sweep():
    ahead = [{"flops": 1e12, "mean": -0.05, "lo": -0.1, "hi": 0.0, "steps": 1},
             {"flops": 2e12, "mean": -0.08, "lo": -0.12, "hi": -0.04, "steps": 2}]
    x = crossover(ahead)
    assert x["flops"] is None and "ahead at every length" in x["text"]
    assert x["hi_flops"] == pytest.approx(1e12)  # the upper bound reaches zero at the first
    assert x["significance"] == ("never significantly behind; significantly ahead above 1e+12 "
                                 "FLOPs")
    behind = [{**p, "mean": -p["mean"], "lo": -p["hi"], "hi": -p["lo"]} for p in ahead]
    assert "behind at every length" in crossover(behind)["text"]
    assert crossover(behind)["significance"] == ("significantly behind above 1e+12 FLOPs; never "
                                                 "significantly ahead")
    # the CPU study's s=2 at 1500 and 3000 steps: behind at the first, not significant at the second
    cpu = [{"flops": 3.53e13, "mean": 0.131, "lo": 0.070, "hi": 0.193, "steps": 1500},
           {"flops": 7.07e13, "mean": 0.074, "lo": -0.031, "hi": 0.179, "steps": 3000}]
    x = crossover(cpu)
    assert x["flops"] is None and "behind at every length" in x["text"]
    assert x["significance"].startswith("significantly behind below ") and \
        x["significance"].endswith("; never significantly ahead")
    assert crossover([{**p, "lo": p["lo"] + 0.1} for p in cpu])["significance"] == \
        "significantly behind at every length; never significantly ahead"
    one = crossover(ahead[:1])
    assert one["flops"] is None and "one length" in one["text"]


def test_curve_speedup_on_both_sides():
    # baseline curve 5.0 -> 3.0 over 300 steps; an arm ending at 3.5 (behind): the baseline
    # reaches 3.5 at step 250 -> 250/300; an arm ending at 2.5 and reaching 3.0 at step 200
    # (ahead) -> 300/200
    base = [record("baseline", 1, 300, 3.0, [(100, 5.0), (200, 4.0), (300, 3.0)])]
    behind = [record("tst-s2-r0.3", 1, 300, 3.5, [(100, 5.5), (200, 4.5), (300, 3.5)])]
    ahead = [record("tst-s3-r0.3", 1, 300, 2.5, [(100, 4.5), (200, 3.0), (300, 2.5)])]
    out = analyze(base + behind + ahead)
    rows = {r["arm"]: r for r in out["lengths"][300]}
    assert rows["tst-s2-r0.3"]["speedup_curves"] == pytest.approx(250 / 300)
    assert rows["tst-s3-r0.3"]["speedup_curves"] == pytest.approx(1.5)
    assert rows["tst-s2-r0.3"]["diff"]["lo"] is None  # one seed: no interval, no p
    assert rows["tst-s2-r0.3"]["diff"]["p"] is None
    assert out["compute"]["tst-s2-r0.3"]["crossover"]["flops"] is None
