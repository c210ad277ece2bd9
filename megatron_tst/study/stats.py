"""The study's statistics, from its runs' records alone (``study.json``'s ``runs``).

Per run length: each arm's final loss on the fixed held-out windows (mean, sd, a 95% Student-t
interval over seeds), its paired difference to the baseline (the same seeds; interval and
two-sided p), and two iso-loss speedups:

- from the in-training validation curves of that length: when the arm ends behind, the step at
  which the baseline's mean curve reaches the arm's final loss over the run's steps (< 1); when
  it ends ahead, the run's steps over the step at which the arm's mean curve reaches the
  baseline's final loss (> 1). Mid-run points are not runs trained to that step (their learning
  rate has not decayed), so this leans towards 1 on both sides;
- across lengths: the baseline compute, interpolated in log FLOPs between the sweep's baseline
  runs (each trained with its own full schedule), that reaches the arm's final loss, over the
  arm's compute. Outside the sweep's baseline losses it is a bound (``>`` or ``<``).

Across lengths, per arm: the gap to the baseline as a function of compute, and the compute where
it crosses zero, interpolated in log FLOPs between the lengths where its sign changes, with the
range where the interval's bounds cross zero.
"""

from __future__ import annotations

import math
import statistics
from typing import Optional

from .runs import BASELINE


def t_quantile(df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, df))


def interval(xs: list[float]) -> dict:
    """Mean, sd and the 95% Student-t interval of the mean (None bounds with one value)."""
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return {"n": len(xs), "mean": mean, "sd": 0.0, "lo": None, "hi": None}
    sd = statistics.stdev(xs)
    half = t_quantile(len(xs) - 1) * sd / math.sqrt(len(xs))
    return {"n": len(xs), "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half}


def paired_p_value(a: list[float], b: list[float]) -> Optional[float]:
    """Two-sided paired t-test over seeds (same seeds in both arms); None with < 2 seeds."""
    if len(a) < 2 or len(a) != len(b):
        return None
    diffs = [x - y for x, y in zip(a, b)]
    sd = statistics.stdev(diffs)
    if sd == 0:
        return 0.0 if statistics.fmean(diffs) != 0 else 1.0
    t = statistics.fmean(diffs) / (sd / math.sqrt(len(diffs)))
    from scipy import stats

    return float(2 * stats.t.sf(abs(t), df=len(diffs) - 1))


def paired(arm: dict[int, float], base: dict[int, float]) -> Optional[dict]:
    """The arm's difference to the baseline over the seeds both have: interval and p."""
    seeds = sorted(set(arm) & set(base))
    if not seeds:
        return None
    out = interval([arm[s] - base[s] for s in seeds])
    out["p"] = paired_p_value([arm[s] for s in seeds], [base[s] for s in seeds])
    out["seeds"] = seeds
    return out


# ------------------------------------------------------------------------------------ iso-loss
def mean_curve(runs: list[dict]) -> list[tuple[int, float]]:
    steps = sorted({v["step"] for v in runs[0]["valid"]})
    by_step = [{v["step"]: v["loss"] for v in r["valid"]} for r in runs]
    return [(s, statistics.fmean(c[s] for c in by_step if s in c)) for s in steps]


def first_step_reaching(curve: list[tuple[int, float]], target: float) -> Optional[float]:
    """First (interpolated) step at which a validation curve reaches ``target``."""
    prev = None
    for step, loss in curve:
        if loss <= target:
            if prev is None:
                return float(step)
            (s0, l0) = prev
            return s0 + (step - s0) * (l0 - target) / (l0 - loss) if l0 != loss else float(step)
        prev = (step, loss)
    return None


def curve_speedup(arm: list[dict], base: list[dict], steps: int) -> Optional[float]:
    """Iso-loss speedup from the in-training validation curves of one length (module doc)."""
    if not arm[0]["valid"] or not base[0]["valid"]:
        return None
    arm_curve, base_curve = mean_curve(arm), mean_curve(base)
    arm_end, base_end = arm_curve[-1][1], base_curve[-1][1]
    if arm_end <= base_end:
        k = first_step_reaching(arm_curve, base_end)
        return steps / k if k else None
    k = first_step_reaching(base_curve, arm_end)
    return k / steps if k else None


def frontier_speedup(base: list[tuple[float, float]], loss: float,
                     flops: float) -> tuple[Optional[float], str]:
    """(speedup, as text): the baseline compute reaching ``loss`` on the frontier ``base``
    [(FLOPs, mean final loss)] of the sweep's lengths, over ``flops``; a bound outside it."""
    pts = sorted(base)
    if len(pts) < 2:
        return None, "-"
    best, worst = min(p[1] for p in pts), max(p[1] for p in pts)
    if loss < best:
        return None, f"> {pts[-1][0] / flops:.2f}x"
    if loss > worst:
        return None, f"< {pts[0][0] / flops:.2f}x"
    for (f0, l0), (f1, l1) in zip(pts, pts[1:]):
        if min(l0, l1) <= loss <= max(l0, l1):
            if l0 == l1:
                x = math.log(f0)
            else:
                x = math.log(f0) + (math.log(f1) - math.log(f0)) * (l0 - loss) / (l0 - l1)
            value = math.exp(x) / flops
            return value, f"{value:.2f}x"
    return None, "-"  # the baseline's losses are not monotone around this loss


# ------------------------------------------------------------------------------ across lengths
def zero_crossing(points: list[tuple[float, float]]) -> Optional[float]:
    """First FLOPs (log-interpolated) where a gap [(FLOPs, gap)] changes sign, or None."""
    pts = sorted(points)
    for (f0, g0), (f1, g1) in zip(pts, pts[1:]):
        if g0 == 0:
            return f0
        if (g0 > 0) != (g1 > 0) or g1 == 0:
            x = math.log(f0) + (math.log(f1) - math.log(f0)) * g0 / (g0 - g1)
            return math.exp(x)
    return None


def crossover(points: list[dict]) -> dict:
    """Where an arm's gap to the baseline [{flops, mean, lo, hi}] crosses zero (module doc)."""
    pts = sorted(points, key=lambda p: p["flops"])
    at = zero_crossing([(p["flops"], p["mean"]) for p in pts])
    bounds = all(p["lo"] is not None for p in pts)
    out = {"flops": at,
           # below this compute TST is worse at 95% (the interval's lower bound above zero) ...
           "lo_flops": zero_crossing([(p["flops"], p["lo"]) for p in pts]) if bounds else None,
           # ... above this compute it is better (the upper bound below zero)
           "hi_flops": zero_crossing([(p["flops"], p["hi"]) for p in pts]) if bounds else None}
    out["significance"] = (_significance(pts, out["lo_flops"], out["hi_flops"])
                           if bounds and len(pts) >= 2 else None)
    if at is not None:
        out["text"] = f"gap crosses zero at {at:.3g} FLOPs"
    elif len(pts) < 2:
        out["text"] = "one length: no crossover to interpolate"
    elif pts[0]["mean"] < 0:
        out["text"] = (f"not within the sweep: TST is ahead at every length "
                       f"(from {pts[0]['flops']:.3g} FLOPs)")
    else:
        out["text"] = (f"not within the sweep: TST is behind at every length "
                       f"(up to {pts[-1]['flops']:.3g} FLOPs)")
    return out


def _significance(pts: list[dict], lo_at: Optional[float], hi_at: Optional[float]) -> str:
    """Where the 95% interval excludes zero: TST significantly behind (lower bound above zero),
    significantly ahead (upper bound below zero)."""
    def side(key: str, sign: int, word: str, at: Optional[float]) -> str:
        inside = [sign * p[key] > 0 for p in pts]
        if all(inside):
            return f"significantly {word} at every length"
        if at is None:
            return f"never significantly {word}"
        return f"significantly {word} {'below' if inside[0] else 'above'} {at:.3g} FLOPs"

    return f"{side('lo', 1, 'behind', lo_at)}; {side('hi', -1, 'ahead', hi_at)}"


def analyze(runs: list[dict], train_tokens: Optional[int] = None) -> dict:
    """The study's figures from its run records (``RunRecord.to_json``)."""
    lengths: dict[int, dict[str, list[dict]]] = {}
    for r in runs:
        lengths.setdefault(r["steps"], {}).setdefault(r["arm"], []).append(r)
    frontier = [(steps * arms[BASELINE][0]["flops_per_step"],
                 statistics.fmean(r["final_loss"] for r in arms[BASELINE]))
                for steps, arms in lengths.items() if BASELINE in arms]
    tables, gaps = {}, {}
    for steps in sorted(lengths):
        arms = lengths[steps]
        base = arms.get(BASELINE)
        base_final = {r["seed"]: r["final_loss"] for r in base} if base else {}
        base_tps = statistics.median(r["tokens_per_s"] for r in base
                                     if r["tokens_per_s"]) if base else None
        rows = []
        for name in sorted(arms, key=lambda a: (a != BASELINE, a)):
            rs = sorted(arms[name], key=lambda r: r["seed"])
            flops = steps * rs[0]["flops_per_step"]
            row = {"arm": name, "steps": steps, "flops": flops,
                   "seeds": [r["seed"] for r in rs],
                   "final": interval([r["final_loss"] for r in rs]),
                   "eval_tokens": rs[0]["eval_tokens"], "data_tokens": rs[0]["data_tokens"],
                   "epochs": rs[0]["data_tokens"] / train_tokens if train_tokens else None,
                   "switch_step": rs[0]["switch_step"], "diff": None,
                   "speedup_curves": None, "speedup_frontier": None,
                   "speedup_frontier_text": "-", "phase1_tokens_per_s_ratio": None}
            if name != BASELINE and base:
                row["diff"] = paired({r["seed"]: r["final_loss"] for r in rs}, base_final)
                row["speedup_curves"] = curve_speedup(rs, base, steps)
                row["speedup_frontier"], row["speedup_frontier_text"] = frontier_speedup(
                    frontier, row["final"]["mean"], flops)
                sup = [r["phase1_tokens_per_s"] for r in rs if r["phase1_tokens_per_s"]]
                if sup and base_tps:
                    row["phase1_tokens_per_s_ratio"] = statistics.median(sup) / base_tps
                if row["diff"]:
                    d = row["diff"]
                    gaps.setdefault(name, []).append(
                        {"steps": steps, "flops": flops, "mean": d["mean"], "lo": d["lo"],
                         "hi": d["hi"], "p": d["p"], "n": d["n"]})
            rows.append(row)
        tables[steps] = rows
    return {"lengths": tables,
            "compute": {arm: {"points": pts, "crossover": crossover(pts)}
                        for arm, pts in gaps.items()}}
