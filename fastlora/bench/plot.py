"""``--plot``: time ratio to ``base`` of every provider, one panel per mode, one bar group per case.
Needs matplotlib (``fastlora bench --plot`` says so before running when it is missing).

The ratio axis is logarithmic and each bar starts at 1 (``base``): one outlier (``compiled`` at
M=1 has reached 410× on a loaded CPU) cannot flatten the other bars onto 1, and 0.8× and 1.25×
are the same distance from the line. Bars beyond ``LABELLED`` (2×, or below 0.5×) carry their value.
"""

from __future__ import annotations

import statistics
from itertools import groupby

from .runner import Result

LABELLED = 2.0  # bars at or beyond this factor from base (either way) are labelled with their value


def _case_label(case, with_dtype: bool) -> str:
    label = f"{case.shape.K}→{case.shape.N}\nM={case.M} r={case.r}"
    return label + f"\n{case.dtype}" if with_dtype else label


def _noise_note(results: list[Result], info: dict) -> str:
    """The typical spread of the run (median half-IQR, in %), and how to get a steadier one."""
    spreads = [50 * (r.q3_ms - r.q1_ms) / r.ms for r in results if r.ratio_to_base is not None and r.ms]
    typical = f"typical spread ±{statistics.median(spreads):.0f} % (median half-IQR)" if spreads else "no spread measured"
    on_gpu = str(info.get("device_detail", "")).startswith("CUDA")
    steady = ("for a steady GPU run: an otherwise idle GPU" if on_gpu
              else "for a steady CPU run: --threads 1 on an otherwise idle machine (load average near 0)")
    return f"{typical}: bars closer than that are not distinguishable\n{steady}"


def plot_ratios(path: str, results: list[Result], info: dict) -> None:
    """Write a PNG of ``ratio_to_base``, whiskers at the provider's quartiles; the dashed line at 1
    is ``base``. Providers that were skipped, wrong or failed in a case have no bar there."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    from matplotlib.ticker import FuncFormatter

    def ratio_label(value: float, _pos=None) -> str:
        return f"{value:g}×"

    def minor_label(value: float, _pos=None) -> str:  # only 2× and 5× between the decades: readable
        return ratio_label(value) if f"{value:.0e}"[0] in "25" else ""

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
    fig = Figure(figsize=(width, 2.8 * len(by_mode) + 1.6), layout="constrained")
    axes = fig.subplots(len(by_mode), 1, squeeze=False)
    colors = colormaps["tab10"]
    for ax, (mode, cases) in zip(axes[:, 0], by_mode.items()):
        ax.set_yscale("log")
        for j, provider in enumerate(providers):
            offset = (j - (len(providers) - 1) / 2) * bar_width
            drawn = [(i + offset, *plotted[c, provider]) for i, c in enumerate(cases) if (c, provider) in plotted]
            xs, ys, lows, highs = zip(*drawn) if drawn else ((), (), (), ())
            whiskers = [[y - lo for y, lo in zip(ys, lows)], [hi - y for y, hi in zip(ys, highs)]]
            # bars from 1 (base) to the ratio, up or down: on a log axis both directions read alike
            ax.bar(xs, [y - 1 for y in ys], bar_width, bottom=1, yerr=whiskers, error_kw={"elinewidth": 0.8, "alpha": 0.6},
                   label=provider if ax is axes[0, 0] else None, color=colors(j % 10))
            for x, y in zip(xs, ys):
                if y >= LABELLED or y <= 1 / LABELLED:
                    ax.annotate(f"{y:.3g}×", (x, y), xytext=(0, 2 if y > 1 else -8), textcoords="offset points",
                                ha="center", fontsize=6)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.yaxis.set_major_formatter(FuncFormatter(ratio_label))
        ax.yaxis.set_minor_formatter(FuncFormatter(minor_label))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_ylabel("time ÷ base (log)")
        ax.set_title(mode, loc="left", fontweight="bold")
        ax.set_xticks(range(len(cases)), [_case_label(c, with_dtype) for c in cases], fontsize=8)
        ax.set_xlim(-0.5, len(cases) - 0.5)
        ax.grid(axis="y", which="both", alpha=0.3)
    fig.suptitle(f"fastlora bench — {info['device']} ({info['device_detail']})\ntorch {info['torch']} — {info['date']}\n"
                 "median time ÷ base (the frozen linear layer alone, dashed line) in the same case; lower is faster\n"
                 f"whiskers: first and third quartiles of the provider's calls\n{_noise_note(results, info)}", fontsize=9)
    fig.legend(loc="outside lower center", ncol=min(len(providers), 8), fontsize=8)
    fig.savefig(path, dpi=110)
