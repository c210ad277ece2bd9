"""The study's report (``report.md``) and plots (``loss_vs_flops.png``, ``gap_vs_flops.png``)."""

from __future__ import annotations

from pathlib import Path

from .runs import BASELINE
from .stats import mean_curve


def _f(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _ci(d: dict, spec: str = ".4f", sign: str = "") -> str:
    if d["lo"] is None:
        return "-"
    return f"[{d['lo']:{sign}{spec}}, {d['hi']:{sign}{spec}}]"


def report_markdown(analysis: dict, meta: dict) -> str:
    lines = [
        f"# Equal-FLOPs study: {meta['recipe']}",
        "",
        (f"Learning rate {meta['lr']:g} (chosen on the baseline at {meta['lr_steps']} steps, "
         f"final loss per rate: {meta['lr_sweep']}). " if meta["lr_sweep"] else
         f"Learning rate {meta['lr']:g} (the recipe's, not swept here). ") +
        f"Training corpus {_f(meta['train_tokens'], ',')} tokens. Every run has its own full "
        f"schedule. Final loss: next-token loss of the final checkpoint on the same "
        f"{meta['eval_what']} for every arm and seed (`megatron-tst eval`), with its 95% "
        f"Student-t interval over seeds. Vs baseline: the paired difference over the seeds both "
        f"have (negative: TST is better), its 95% interval and the two-sided paired t-test's p. "
        f"Iso-loss speedup (> 1: TST reaches the loss with less compute): from the in-training "
        f"validation curves of the same length, and across lengths from the baseline's final "
        f"losses (log-interpolated in FLOPs; a bound outside the sweep).",
    ]
    for steps, rows in analysis["lengths"].items():
        lines += ["", f"## {steps} steps ({rows[0]['flops']:.3g} FLOPs per run)", "",
                  "| arm | seeds | final loss (mean ± sd) | 95% interval | vs baseline | "
                  "95% interval | p | iso-loss speedup (curves) | iso-loss speedup (across "
                  "lengths) | data tokens | epochs | phase-1 tokens/s vs baseline |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            f, d = r["final"], r["diff"]
            lines.append(
                f"| {r['arm']} | {len(r['seeds'])} | {f['mean']:.4f} ± {f['sd']:.4f} | "
                f"{_ci(f)} | {'-' if d is None else format(d['mean'], '+.4f')} | "
                f"{'-' if d is None else _ci(d, sign='+')} | "
                f"{_f(d and d['p'], '.3g')} | {_f(r['speedup_curves'], '.2f')}"
                f"{'x' if r['speedup_curves'] else ''} | {r['speedup_frontier_text']} | "
                f"{r['data_tokens']:,} | {_f(r['epochs'], '.2f')} | "
                f"{_f(r['phase1_tokens_per_s_ratio'], '.2f')} |")
    if analysis["compute"]:
        lines += ["", "## The gap as a function of compute", "",
                  "| arm | steps | FLOPs | gap to baseline | 95% interval | p |",
                  "|---|---|---|---|---|---|"]
        for arm, c in analysis["compute"].items():
            for p in sorted(c["points"], key=lambda p: p["flops"]):
                lines.append(f"| {arm} | {p['steps']} | {p['flops']:.3g} | {p['mean']:+.4f} | "
                             f"{_ci(p, sign='+')} | {_f(p['p'], '.3g')} |")
        lines.append("")
        for arm, c in analysis["compute"].items():
            x = c["crossover"]
            bounds = f" (95%: TST {x['significance']})" if x.get("significance") else ""
            lines.append(f"- {arm}: {x['text']}{bounds}.")
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(runs: list[dict], analysis: dict, path: Path, title: str) -> None:
    """In-training validation curves (mean over seeds; one line style per length) and each
    length's final losses on the fixed windows with their intervals."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    arms = sorted({r["arm"] for r in runs}, key=lambda a: (a != BASELINE, a))
    color = {a: f"C{i}" for i, a in enumerate(arms)}
    styles = ["-", "--", ":", "-."]
    for i, steps in enumerate(sorted({r["steps"] for r in runs})):
        for arm in arms:
            rs = [r for r in runs if r["arm"] == arm and r["steps"] == steps]
            if not rs or not rs[0]["valid"]:
                continue
            curve = mean_curve(rs)
            fps = rs[0]["flops_per_step"]
            ax.plot([s * fps for s, _ in curve], [v for _, v in curve], ls=styles[i % 4],
                    color=color[arm], lw=1, alpha=0.6,
                    label=f"{arm}, {steps} steps ({len(rs)} seeds)")
    for rows in analysis["lengths"].values():
        for r in rows:
            f = r["final"]
            err = None if f["lo"] is None else [[f["mean"] - f["lo"]], [f["hi"] - f["mean"]]]
            ax.errorbar([r["flops"]], [f["mean"]], yerr=err, fmt="o", ms=5, capsize=3,
                        color=color[r["arm"]])
    ax.set_xlabel("cumulative training FLOPs")
    ax.set_ylabel("validation next-token loss")
    ax.set_title(f"{title}: in-training curves; points: final loss on the fixed windows (95%)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gap(analysis: dict, path: Path, title: str) -> None:
    """Each arm's paired gap to the baseline against compute, with its 95% interval."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (arm, c) in enumerate(sorted(analysis["compute"].items())):
        pts = sorted(c["points"], key=lambda p: p["flops"])
        xs, ys = [p["flops"] for p in pts], [p["mean"] for p in pts]
        err = None
        if all(p["lo"] is not None for p in pts):
            err = [[p["mean"] - p["lo"] for p in pts], [p["hi"] - p["mean"] for p in pts]]
        ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=4, color=f"C{i + 1}", label=arm)
        if c["crossover"]["flops"]:
            ax.axvline(c["crossover"]["flops"], color=f"C{i + 1}", ls=":", lw=1)
    ax.axhline(0, color="k", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs per run")
    ax.set_ylabel("final loss minus baseline's (nats; < 0: TST better)")
    ax.set_title(f"{title}: gap to the equal-FLOPs baseline (95% intervals)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
