"""Results as Markdown tables and a plot, in bench/results/ (docs/benchmarks.md links them)."""

from __future__ import annotations

import math
from pathlib import Path


def _n(value, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _cores(cores: dict | None, names: tuple[str, ...]) -> str:
    return " / ".join(f"{cores[n]:.2f}" for n in names) if cores else "n/a"


def scorer_tables(result: dict) -> list[str]:
    lines = [f"### Scorer ({result['device']}, torch threads {result['torch_threads']})", ""]
    batches = [row["batch"] for row in result["sweeps"][0]["batched"]]
    lines.append("| model | parameters | per-window loop | " + " | ".join(f"batch {b}" for b in batches)
                 + " | best / loop |")
    lines.append("| --- | ---: | ---: | " + " | ".join("---:" for _ in batches) + " | ---: |")
    for sweep in result["sweeps"]:
        c = sweep["config"]
        name = f"{sweep['model']} (emb {c['embedding_dim']}, hidden {c['hidden_dim']})"
        cells = [f"{_n(row['windows_per_s'])} ({row['ratio_to_loop']:.1f}x)" for row in sweep["batched"]]
        lines.append(f"| {name} | {sweep['parameters']:,} | {_n(sweep['loop_windows_per_s'])} | "
                     + " | ".join(cells) + f" | **{sweep['best_ratio_to_loop']:.1f}x** |")
    lines += ["", "Windows/s (and ratio to the per-window loop, measured in alternating turns in the same run).",
              "Per-window loop = batch 1, `no_grad`, one `.item()` per window, the seed tutorial's way; "
              f"its errors equal the batched scorer's: {all(s['loop_matches_batched'] for s in result['sweeps'])}.", ""]

    rule = result["rule"]
    evaluation = result.get("evaluation")
    lines.append(f"Optimisations at batch {result['sizes']['opt_batch']}, each against its own 'off' setting "
                 f"(kept if >= {rule['min_speedup']:.2f}x on the default model and |AUROC delta| <= "
                 f"{rule['max_auroc_delta']}):")
    lines.append("")
    if evaluation:
        lines.append(f"AUROC on {evaluation['source']} ({evaluation['windows']:,} windows, "
                     f"{evaluation['anomalous']:,} anomalous), model `{evaluation['model_version']}`.")
        lines.append("")
    lines.append("| optimisation | speed-up default | speed-up reference | AUROC off | AUROC on | delta | kept |")
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for row in result["optimisations"]:
        if "error" in row:
            lines.append(f"| {row['optimisation']} | failed: {row['error'][:90]} | | | | | no |")
            continue
        models = row["models"]
        kept = {True: "**yes**", False: "no", None: "not checked"}[row["kept"]]
        lines.append(f"| {row['optimisation']} | {models['default']['ratio']:.2f}x | "
                     f"{models['reference']['ratio']:.2f}x | "
                     f"{_n(row.get('auroc_off'), 4)} | {_n(row.get('auroc_on'), 4)} | "
                     f"{_n(row.get('auroc_delta'), 4)} | {kept} |")
    lines.append("")
    return lines


def e2e_tables(result: dict) -> list[str]:
    memory = result["memory"]
    lines = [f"### End to end ({result['device']}, {result['partitions']} partitions, "
             f"max batch {result['max_batch']})", ""]
    lines.append("| figure | value |")
    lines.append("| --- | ---: |")
    lines.append(f"| raw batched scorer (same model, batch {result['max_batch']}) | "
                 f"{_n(result['raw_scorer_windows_per_s'])} windows/s |")
    lines.append(f"| daemon, maximum sustained ({result['backlog']['sensors']:,} sensors, "
                 f"{result['backlog']['windows']:,}-window backlog) | {_n(result['max_windows_per_s'])} windows/s |")
    lines.append(f"| daemon / raw scorer | **{result['ratio_to_raw_scorer']:.0%}** |")
    lines.append("| CPU cores used while draining (daemon / broker) | "
                 f"{_cores(result['drain'].get('cpu_cores'), ('daemon', 'broker'))} |")
    lines.append(f"| RSS at {memory['active_sensors_at_last']:,} live sensors | {memory['rss_mib_at_last']:,.1f} MiB |")
    lines.append(f"| memory per live sensor (RSS slope) | {_n(memory['bytes_per_sensor'])} bytes |")
    lines.append("")
    runs = result["latency_runs"]
    lines.append(f"Latency: {runs['per_load']} run(s) of {runs['seconds']:g} s per load, each on a fresh broker and "
                 "daemon, pooled.")
    lines.append("")
    lines.append("| load | sensors (140 Hz) | target windows/s | achieved | windows | scored | p50 | p99 | max "
                 "| p99 of each run | CPU cores: daemon / broker / load generator |")
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in result["latency"]:
        each = " / ".join(_n(p99) for p99 in row["p99_ms_per_run"])
        lines.append(f"| {row['load']:.0%} | {row['sensors']:,} | {_n(row['target_windows_per_s'])} | "
                     f"{_n(row['achieved_windows_per_s'])} | {row['windows']:,} | {row['windows_scored']:,} | "
                     f"{_n(row['p50_ms'])} ms | {_n(row['p99_ms'])} ms | {_n(row['max_ms'])} ms | {each} ms | "
                     f"{_cores(row.get('cpu_cores'), ('daemon', 'broker', 'load generator'))} |")
    lines.append("")
    return lines


def reliability_tables(result: dict) -> list[str]:
    lines = ["### Reliability suite", "",
             f"`{result['command']}`: exit code {result['exit_code']}, {result['summary']}", "",
             "| test | records tried | faults injected | windows expected | windows lost |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for test, figures in result["tests"].items():
        lines.append(f"| {test} | {figures.get('records_tried', 0):,} | {figures.get('faults_injected', 0):,} | "
                     f"{figures.get('windows_expected', 0):,} | {figures.get('windows_lost', 0):,} |")
    t = result["totals"]
    lines.append(f"| **total** | **{t.get('records_tried', 0):,}** | **{t.get('faults_injected', 0):,}** | "
                 f"**{t.get('windows_expected', 0):,}** | **{t.get('windows_lost', 0):,}** |")
    lines.append("")
    return lines


def targets(results: dict) -> list[str]:
    lines = ["### Targets", "", "| target | reached | met |", "| --- | ---: | --- |"]
    if "scorer" in results:
        default = next(s for s in results["scorer"]["sweeps"] if s["model"] == "default")
        reference = next(s for s in results["scorer"]["sweeps"] if s["model"] == "reference")
        for sweep in (default, reference):
            lines.append(f"| batched scorer >= 20x per-window loop ({sweep['model']} model) | "
                         f"{sweep['best_ratio_to_loop']:.1f}x | "
                         f"{'yes' if sweep['best_ratio_to_loop'] >= 20 else 'no'} |")
    if "e2e" in results:
        e2e = results["e2e"]
        lines.append(f"| end to end >= 50% of raw batched scorer | {e2e['ratio_to_raw_scorer']:.0%} | "
                     f"{'yes' if e2e['ratio_to_raw_scorer'] >= 0.5 else 'no'} |")
        half = next((row for row in e2e["latency"] if row["load"] == 0.5), None)
        if half:
            lines.append(f"| p99 <= 250 ms at 50% load | {_n(half['p99_ms'])} ms | "
                         f"{'yes' if half['p99_ms'] <= 250 else 'no'} |")
    if "reliability" in results:
        lost = results["reliability"]["totals"].get("windows_lost", 0)
        met = lost == 0 and results["reliability"]["exit_code"] == 0
        lines.append(f"| no window lost under faults | {lost} lost | {'yes' if met else 'no'} |")
    lines.append("")
    return lines


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [f"## Benchmark results ({meta['device']}{', quick' if meta['quick'] else ''})", "",
             f"{meta['when']}; {meta['cpu']}, {meta['cores']} cores, load average {meta['loadavg']} at start; "
             f"torch {meta['torch']}, python {meta['python']}. Command: `{meta['command']}`.", ""]
    lines += targets(results)
    if "scorer" in results:
        lines += scorer_tables(results["scorer"])
    if "e2e" in results:
        lines += e2e_tables(results["e2e"])
    if "reliability" in results:
        lines += reliability_tables(results["reliability"])
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> bool:
    """A PNG beside the tables: scorer windows/s against batch size (the per-window loop as a
    dashed line), and latency p50/p99 against load with the 250 ms target. False when there is
    nothing to plot or matplotlib (the `train` extra) is missing."""
    panels = [part for part in ("scorer", "e2e") if part in results]
    if not panels:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, part in zip(axes[0], panels, strict=True):
        if part == "scorer":
            for sweep, color in zip(results["scorer"]["sweeps"], ("tab:blue", "tab:orange"), strict=True):
                rows = sweep["batched"]
                ax.plot([r["batch"] for r in rows], [r["windows_per_s"] for r in rows], "o-", color=color,
                        label=f"{sweep['model']}, batched")
                ax.axhline(sweep["loop_windows_per_s"], color=color, linestyle="--",
                           label=f"{sweep['model']}, per-window loop")
            ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="windows/s",
                   title=f"Scorer ({results['scorer']['device']}, {results['scorer']['torch_threads']} thread(s))")
        else:
            rows = results["e2e"]["latency"]
            loads = [100 * r["load"] for r in rows]
            ax.plot(loads, [r["p50_ms"] for r in rows], "o-", label="p50")
            ax.plot(loads, [r["p99_ms"] for r in rows], "s-", label="p99")
            ax.axhline(250, color="tab:red", linestyle=":", label="p99 target (250 ms)")
            ax.set(xlabel="load (% of the daemon's maximum sustained rate)", ylabel="latency (ms)", ylim=(0, None),
                   title=f"End to end: max {results['e2e']['max_windows_per_s']:,.0f} windows/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(results: dict, json_path: Path) -> tuple[str, bool]:
    """The tables (.md) and the plot (.png) beside `json_path`; returns the tables and whether
    the plot was drawn."""
    text = markdown(results)
    json_path.with_suffix(".md").write_text(text)
    return text, plot(results, json_path.with_suffix(".png"))


if __name__ == "__main__":  # python -m bench.report RESULTS.json: redraw the tables and the plot
    import json
    import sys

    source = Path(sys.argv[1])
    write(json.loads(source.read_text()), source)
