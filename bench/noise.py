"""Motion noise: anomaly alerts that electrode motion raises, with and without the template's artefact rule.

    python -m bench.noise --clean DIR/118.hea --noisy DIR/118e06.hea DIR/118e24.hea [--model FILE]

The MIT-BIH Noise Stress Test Database adds recorded electrode-motion noise to a clean MIT-BIH record in
two-minute stretches (from minute 5, every other two minutes) at a set signal-to-noise ratio (118e06: 6 dB,
118e24: 24 dB). The noisy minutes are where the noisy record differs from the clean one (per second, the SD of
the difference above 0.01 mV). Each record is scored as the daemon would, one sensor from its start: the beats
its windower cuts, the raw-sample quality check (`monitor.stream.quality`) on each beat's span, the model's error,
calibration, the template and rhythm scores, the shipped alert policy. Baseline in the same run: the same beats
with the artefact rule off (`TemplateConfig(artefact_beats=0)`). Writes bench/results/noise.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import numpy as np

from monitor.core.artefact import Artefact
from monitor.core.scoring import Scorer
from monitor.stream import template
from monitor.stream.policy import FIRING, SIGNAL_QUALITY
from trainer import recordings, streams
from trainer.pipeline import CONVENTION, served_policy

REPO = Path(__file__).resolve().parents[1]
RULES = {"artefact rule (shipped)": template.TemplateConfig(),
         "no artefact rule": template.TemplateConfig(artefact_beats=0)}


def noisy_seconds(noisy: recordings.Recording, clean: recordings.Recording) -> np.ndarray:
    """Per whole second of the record, whether noise was added to it."""
    fs = int(noisy.fs)
    difference = noisy.signal - clean.signal
    seconds = len(difference) // fs
    return np.asarray(difference[:seconds * fs].reshape(seconds, fs).std(axis=1) > 0.01)


def figures(scorer: Scorer, record: recordings.Recording, in_noise_s: np.ndarray | None) -> dict[str, dict[str, int]]:
    """Per rule: beats, beats in the noisy minutes, artefact beats there and elsewhere, anomaly and
    signal_quality alerts there and elsewhere."""
    prior, policy = served_policy(scorer.artefact)
    cut = recordings.cut(record, CONVENTION)
    beats = cut.beats
    errors = scorer.score(beats.windows[:, :, None])
    clean_samples = np.array([p is None for p in recordings.sample_problems(cut)], dtype=bool)
    in_noise = np.zeros(len(beats), dtype=bool)
    if in_noise_s is not None:
        in_noise = in_noise_s[np.minimum((beats.r_peak / record.fs).astype(int), len(in_noise_s) - 1)]
    out = {}
    for name, config in RULES.items():
        stream = streams.annotated_stream(record.name, errors, beats.r_peak / record.fs, cut.labels.tolist(),
                                          clean_samples, beats.recorded_windows(), beats.rr_s, config)
        artefact = clean_samples & ~np.asarray(stream.good_quality, dtype=bool)
        scored, _ = streams.run_policy([stream], prior, policy=policy)
        transitions = streams.policy_alerts(scored[0], policy)
        fired = np.array([i for i, t in transitions if t == FIRING], dtype=np.int64)
        sq = np.array([i for i, t in transitions if t == SIGNAL_QUALITY], dtype=np.int64)
        out[name] = {"beats": len(beats), "beats in noise": int(in_noise.sum()),
                     "artefact beats in noise": int((artefact & in_noise).sum()),
                     "artefact beats elsewhere": int((artefact & ~in_noise).sum()),
                     "anomaly alerts in noise": int(in_noise[fired].sum()),
                     "anomaly alerts elsewhere": int((~in_noise[fired]).sum()),
                     "signal_quality alerts": len(sq), "bad raw samples": int((~clean_samples).sum())}
    return out


def markdown(model: str, rows: dict[str, tuple[float, dict[str, dict[str, int]]]]) -> str:
    keys = list(next(iter(next(iter(rows.values()))[1].values())))
    lines = [f"# Motion noise (`python -m bench.noise`, {datetime.date.today()})", "",
             f"Model `{model}`, its served alert policy; one sensor per record, from its start. "
             "Noisy minutes: where the record differs from the clean one.", "",
             "| record | minutes with noise | rule | " + " | ".join(keys) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in keys) + " |"]
    for record, (minutes, per_rule) in rows.items():
        for rule, row in per_rule.items():
            lines.append(f"| {record} | {minutes:.1f} | {rule} | " + " | ".join(str(row[k]) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.noise", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clean", type=Path, required=True, help="the clean record's WFDB header (118.hea)")
    parser.add_argument("--noisy", type=Path, nargs="+", required=True, help="its noise stress test versions")
    parser.add_argument("--model", type=Path, default=REPO / "monitor" / "models" / "default.pt")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="results directory")
    args = parser.parse_args(argv)
    scorer = Scorer(Artefact.load(args.model), device="cpu")
    clean = recordings.read_wfdb(args.clean)
    rows = {clean.name: (0.0, figures(scorer, clean, None))}
    for header in args.noisy:
        noisy = recordings.read_wfdb(header)
        if noisy.fs != clean.fs or len(noisy.signal) != len(clean.signal):
            raise SystemExit(f"{header}: not the same length and rate as {args.clean}")
        seconds = noisy_seconds(noisy, clean)
        rows[noisy.name] = (seconds.sum() / 60, figures(scorer, noisy, seconds))
    model = str(args.model.relative_to(REPO) if args.model.is_relative_to(REPO) else args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "noise.json").write_text(json.dumps(
        {"model": model, "records": {name: {"noisy_minutes": minutes, "rules": per_rule}
                                     for name, (minutes, per_rule) in rows.items()}}, indent=1) + "\n")
    text = markdown(model, rows)
    (args.out / "noise.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
