"""Other sampling rates: annotated recordings resampled to other rates, through what `ecg-trainer evaluate` runs.

    python -m bench.rates --data DIR [--rates 128 250 500 1000] [--model FILE]

Holter recorders and wearables often sample at 125-128 or 250 Hz, diagnostic carts at 500 or 1000; the model's
beats are cut at any rate, but the R-peak detector, the raw-sample quality check and the template see the samples
themselves. Each record under DIR (WFDB with `.atr` reference beats: the 48 other patients of docs/model-card.md)
is resampled in memory with a polyphase filter (`scipy.signal.resample_poly`), its reference beats moved to the
nearest new sample, and scored as the daemon would (`trainer.evaluate.evaluate_recording`), pooled over the
records (`pool_recordings`). Baseline in the same run: the records as recorded. Writes bench/results/rates.json
and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.rpeaks import resample
from monitor.core.artefact import Artefact
from monitor.core.scoring import Scorer
from trainer import recordings
from trainer.evaluate import evaluate_recording, pool_recordings, without_most
from trainer.pipeline import CONVENTION, served_policy

REPO = Path(__file__).resolve().parents[1]
AS_RECORDED = "as recorded"


def resampled(record: recordings.Recording, fs: int) -> recordings.Recording:
    """The record at `fs` Hz, its reference beats at the nearest new sample (`bench.rpeaks.resample`)."""
    annotations = record.annotations
    samples = np.empty(0, dtype=np.int64) if annotations is None else annotations.samples
    signal, samples = resample(record.signal, record.fs, samples, fs)
    if annotations is not None:
        keep = samples < len(signal)
        annotations = recordings.Annotations(samples[keep], annotations.classes[keep])
    return recordings.Recording(record.name, signal, float(fs), record.lead, annotations)


def figures(scorer: Scorer, records: list[recordings.Recording], fs: int | None) -> dict[str, Any]:
    """The pooled evaluation of the records at `fs` (None: as recorded)."""
    prior, policy = served_policy(scorer.artefact)
    results = []
    for record in tqdm(records, desc=f"{fs:g} Hz" if fs else AS_RECORDED, leave=False):
        at_rate = record if fs is None else resampled(record, fs)
        results.append(evaluate_recording(scorer, recordings.cut(at_rate, CONVENTION), prior, policy))
    pooled = pool_recordings(results)
    inputs = pooled["policy_input_auroc_by_class"]
    return {"false_alerts": pooled["false_alerts"], "normal_hours": pooled["normal_hours"],
            "false_alerts_per_hour": pooled["false_alerts_per_hour"],
            "runs_3plus": pooled["runs_3plus"], "ventricular_runs_3plus": pooled["ventricular_runs_3plus"],
            "bad_quality_beats": pooled["bad_quality_beats"], "beats": pooled["beats"],
            "v_vs_n_policy_auroc": inputs.get("V"), "s_vs_n_policy_auroc": inputs.get("S")}


def markdown(model: str, rows: dict[str, dict[str, Any]], n_records: int) -> str:
    def auroc(spread: dict[str, Any] | None) -> str:
        return "-" if spread is None else f"{spread['median']:.3f} / {spread['min']:.3f}"

    def runs(r: dict[str, Any]) -> str:
        runs_3plus, rest = r["runs_3plus"], without_most(r["runs_3plus"])
        both = f"{runs_3plus['alerting']} / {runs_3plus['runs']}"
        if rest is None:
            return both
        return f"{both} (without {runs_3plus['most_runs']['recording']}: {rest[0]} / {rest[1]})"

    lines = [f"# Other sampling rates (`python -m bench.rates`, {datetime.date.today()})", "",
             f"Model `{model}`, its served alert policy; {n_records} annotated records, each one sensor from its "
             "start, resampled in memory (`resample_poly`). Baseline: the records as recorded.", "",
             "| rate | false alerts / h (count, normal hours) | runs of 3+ with an alert open | ventricular runs "
             "(3+ V beats in a row) with an alert open | bad-quality beats (by reason) | V vs N policy-input AUROC, "
             "median / worst | S vs N, median / worst |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for rate, r in rows.items():
        bad, v_runs = sum(r["bad_quality_beats"].values()), r["ventricular_runs_3plus"]
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["bad_quality_beats"].items()) if v)
        lines.append(f"| {rate} | {r['false_alerts_per_hour']:.2f} ({r['false_alerts']}, {r['normal_hours']:.1f} h) | "
                     f"{runs(r)} | {v_runs['alerting']} / {v_runs['runs']} | {bad} of {r['beats']} ({reasons}) | "
                     f"{auroc(r['v_vs_n_policy_auroc'])} | {auroc(r['s_vs_n_policy_auroc'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rates", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a folder of WFDB records with .atr reference beats")
    parser.add_argument("--rates", type=int, nargs="+", default=[128, 250, 500, 1000],
                        help="rates to resample to (Hz)")
    parser.add_argument("--model", type=Path, default=REPO / "monitor" / "models" / "default.pt")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="results directory")
    args = parser.parse_args(argv)
    scorer = Scorer(Artefact.load(args.model), device="cpu")
    records = [recordings.read_wfdb(header) for header in recordings.wfdb_headers(args.data)]
    rows = {AS_RECORDED: figures(scorer, records, None)}
    for fs in args.rates:
        rows[f"{fs:g} Hz"] = figures(scorer, records, fs)
    model = str(args.model.relative_to(REPO) if args.model.is_relative_to(REPO) else args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rates.json").write_text(json.dumps({"model": model, "records": len(records), "rows": rows},
                                                    indent=1) + "\n")
    text = markdown(model, rows, len(records))
    (args.out / "rates.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
