"""``--plot``: time ratio to ``base`` of every provider, one panel per mode, one bar group per case.
Needs matplotlib (``fastlora bench --plot`` says so before running when it is missing)."""

from __future__ import annotations

from itertools import groupby

from .runner import Result


def _case_label(case, with_dtype: bool) -> str:
    label = f"{case.shape.K}→{case.shape.N}\nM={case.M} r={case.r}"
    return label + f"\n{case.dtype}" if with_dtype else label


def plot_ratios(path: str, results: list[Result], info: dict) -> None:
    """Write a PNG of ``ratio_to_base``, whiskers at the provider's quartiles; the dashed line at 1
    is ``base``. Providers that were skipped, wrong or failed in a case have no bar there."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    # ratio to base, and the ratios of the provider's first and third quartiles as whiskers
    plotted = {
        (r.case, r.provider): (r.ratio_to_base, r.ratio_to_base * r.q1_ms / r.ms, r.ratio_to_base * r.q3_ms / r.ms)
        for r in results
        if r.ratio_to_base is not None and r.provider != "base"
    }
    providers = list(dict.fromkeys(provider for _, provider in plotted))
    by_mode = {mode: list(dict.fromkeys(r.case for r in rs)) for mode, rs in groupby(results, key=lambda r: r.case.mode)}
    with_dtype = len({r.case.dtype for r in results}) > 1
    widest = max(len(cases) for cases in by_mode.values())
    bar_width = 0.8 / max(1, len(providers))
    width = max(8.0, 0.15 * widest * max(1, len(providers)) + 2)
    fig = Figure(figsize=(width, 2.8 * len(by_mode) + 1.2), layout="constrained")
    axes = fig.subplots(len(by_mode), 1, squeeze=False)
    colors = colormaps["tab10"]
    for ax, (mode, cases) in zip(axes[:, 0], by_mode.items()):
        for j, provider in enumerate(providers):
            offset = (j - (len(providers) - 1) / 2) * bar_width
            drawn = [(i + offset, *plotted[c, provider]) for i, c in enumerate(cases) if (c, provider) in plotted]
            xs, ys, lows, highs = zip(*drawn) if drawn else ((), (), (), ())
            whiskers = [[y - lo for y, lo in zip(ys, lows)], [hi - y for y, hi in zip(ys, highs)]]
            ax.bar(xs, ys, bar_width, yerr=whiskers, error_kw={"elinewidth": 0.8, "alpha": 0.6},
                   label=provider if ax is axes[0, 0] else None, color=colors(j % 10))
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_ylabel("time ÷ base")
        ax.set_title(mode, loc="left", fontweight="bold")
        ax.set_xticks(range(len(cases)), [_case_label(c, with_dtype) for c in cases], fontsize=8)
        ax.set_xlim(-0.5, len(cases) - 0.5)
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"fastlora bench — {info['device']} ({info['device_detail']})\ntorch {info['torch']} — {info['date']}\n"
                 "median time ÷ base (the frozen linear layer alone, dashed line) in the same case; lower is faster\n"
                 "whiskers: first and third quartiles of the provider's calls", fontsize=10)
    fig.legend(loc="outside lower center", ncol=min(len(providers), 8), fontsize=8)
    fig.savefig(path, dpi=110)
