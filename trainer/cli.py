"""`ecg-trainer` / `python -m trainer`: fit, evaluate, info.

Every TrainerSettings field is a flag of `fit` (`embedding_dim` -> `--embedding-dim`); flags
override the environment (TRAINER_*) and `.env`, which override the defaults shown by --help.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal
from collections.abc import Callable, Sequence

from pydantic import ValidationError

from monitor.core.artefact import Artefact, ArtefactError
from trainer.data import DataError
from trainer.settings import TrainerSettings

#: Settings that `evaluate` accepts besides --model (the ones that say how to read the data).
DATA_FIELDS = ("data", "fs", "lead", "cache_dir", "label_column", "normal_label", "n_features", "verify_digest",
               "limit", "torch_threads")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        return _fail(f"invalid settings: {problems}")
    except (DataError, ArtefactError, ValueError, RuntimeError, OSError) as exc:
        return _fail(str(exc))


def _fail(message: str) -> int:
    print(f"ecg-trainer: error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecg-trainer", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="{fit,evaluate,info}")
    fit = sub.add_parser("fit", help="train, choose the threshold, evaluate on the held-out test set, save",
                         description="Train on normal-train windows, choose the threshold on validation, "
                                     "evaluate on the test set, choose the alert policy for the false-alert "
                                     "budget on validation streams, write the artefact (and the report). "
                                     "--data may be ECG5000, a table of windows, or continuous recordings "
                                     "(a WFDB .hea or a directory of them; a CSV/Parquet/NPY lead with --fs): "
                                     "these are cut into beats as the monitor does, and the beats annotated "
                                     "normal (AAMI N in a WFDB .atr; all beats without annotations) are "
                                     "trained on.")
    for name in TrainerSettings.model_fields:
        _add_setting(fit, name)
    fit.add_argument("--json", action="store_true", help="print the report as JSON instead of a summary")
    fit.set_defaults(handler=cmd_fit)

    evaluate = sub.add_parser("evaluate", help="re-evaluate an artefact on data",
                              description="Score data with an artefact (through monitor.core.scoring.Scorer). The "
                                          "data are split with the artefact's own seed and fractions, so "
                                          "--subset test is the held-out test set of its training run. On a "
                                          "recording (WFDB .hea, or a lead with --fs) every beat is scored in "
                                          "order: per-class AUROC (normal vs each AAMI class) and share flagged "
                                          "at the threshold, R-peak sensitivity/PPV against the .atr beats "
                                          "(150 ms), and the model's calibrated alert policy over the beat "
                                          "stream (false alerts per hour, runs detected, NAB).")
    evaluate.add_argument("--model", type=Path, required=True, help="model artefact")
    for name in DATA_FIELDS:
        _add_setting(evaluate, name)
    evaluate.add_argument("--subset", choices=("test", "val", "train", "all"), default="test",
                          help="which windows to score (default: test; a recording is scored whole)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(handler=cmd_evaluate)

    info = sub.add_parser("info", help="print an artefact's metadata as JSON")
    info.add_argument("--model", type=Path, required=True, help="model artefact")
    info.add_argument("--history", action="store_true", help="include the per-epoch loss history")
    info.set_defaults(handler=cmd_info)
    return parser


def _add_setting(parser: argparse.ArgumentParser, name: str) -> None:
    """One flag per settings field; unset flags stay out, so environment values still apply."""
    field = TrainerSettings.model_fields[name]
    kind, optional = _unwrap(field.annotation)
    default = field.default
    shown = "empty" if default is None else default
    help_text = f"{field.description + ' ' if field.description else ''}(default: {shown}; env TRAINER_{name.upper()})"
    options: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}
    if kind is bool:
        options["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is Literal:
        options["choices"] = typing.get_args(kind)
    else:
        options["type"] = _parse_optional(kind) if optional else kind
        options["metavar"] = {int: "N", float: "X", str: "TEXT"}.get(kind, "DIR" if "dir" in name else "PATH")
    parser.add_argument(f"--{name.replace('_', '-')}", **options)


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(X, True) for `X | None`, else (annotation, False)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _parse_optional(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() in ("", "none") else kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def _settings(args: argparse.Namespace) -> TrainerSettings:
    given = {k: v for k, v in vars(args).items() if k in TrainerSettings.model_fields}
    return TrainerSettings(**given)


def cmd_fit(args: argparse.Namespace) -> int:
    from trainer.pipeline import fit_model

    settings = _settings(args)
    outcome = fit_model(settings)
    report = outcome.report
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    t, training = report["test"], report["training"]
    print(f"saved {outcome.path}  ({report['model_version']})")
    print(f"threshold {report['threshold']['value']:.4f} ({report['threshold']['method']}); best epoch "
          f"{training['best_epoch']} of {training['epochs_run']} ({training['stop_reason']}), "
          f"fit {training['fit_seconds']:.1f} s")
    print(_summary(t))
    print(_policy_summary(report["operating_point"]))
    if settings.report_dir is not None:
        print(f"report: {settings.report_dir}/report.md")
    return 0


def _summary(m: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    cm = m["confusion_matrix"]
    rates = ", ".join(f"{label}: {row['rate']:.3f}" for label, row in m["per_class"].items())
    return (f"test n={m['n']} ({m['n_anomalous']} anomalous): AUROC {f(m['auroc'])}  AP {f(m['average_precision'])}  "
            f"precision {f(m['precision'])}  recall {f(m['recall'])}  F1 {f(m['f1'])}\n"
            f"confusion tn={cm['tn']} fp={cm['fp']} fn={cm['fn']} tp={cm['tp']}; share flagged per class: {rates}")


def _streams_summary(streams: dict[str, Any]) -> str:
    p = streams["policy"]
    seeds = ", ".join(f"{r['false_alerts_per_hour']:.2f}/h {r['detection_rate']:.1%}" for r in streams["per_seed"])
    return (f"test streams ({streams['sensor_hours_per_seed']} sensor-hours of each kind per seed, 1 beat/s), alert "
            f"policy {p['aggregate']} over {p['fire_level']:.3f}: {streams['false_alerts_per_hour']:.2f} false alerts "
            f"per sensor-hour, {streams['detection_rate']:.1%} of injected anomalous runs detected (per seed: {seeds})")


def _policy_summary(point: dict[str, Any]) -> str:
    c, p = point["chosen"], point["policy"]
    detected = "n/a (no anomalous validation beats)" if c["detection_rate"] is None else f"{c['detection_rate']:.1%}"
    return (f"alert policy: {p['aggregate']} ({c['param']:g}) over {p['fire_level']:.3f}, resolve under "
            f"{p['resolve_level']:.3f}: {c['false_alerts_per_hour']:.2f} false alerts per sensor-hour "
            f"(budget {point['budget_per_hour']:g}{'' if point['budget_met'] else ', NOT met'}), "
            f"runs detected {detected}")


def _rules(policy: dict[str, Any]) -> str:
    """The policy's firing rules, e.g. "mean over 4.106, or 3 fast beats unlike the usual one"."""
    fast = policy.get("fast_run_beats")
    return f"{policy['aggregate']} over {policy['fire_level']:.3f}" + (
        f", or {fast} fast beats unlike the usual one" if fast and policy.get("template_weight") else "")


def _recording_summary(r: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    lines = [f"{r['recording']}: {r['beats']} beats in {r['duration_s'] / 60:.1f} min at {r['fs']:g} Hz "
             f"({r['unmatched_beats']} matching no reference beat), threshold {r['threshold']:.4f}"]
    for cls, row in r["per_class"].items():
        auroc = "" if row["auroc_vs_normal"] is None else f"   AUROC vs N {row['auroc_vs_normal']:.4f}"
        lines.append(f"  {cls} {row['name']:<26} n={row['n']:<6} flagged {row['rate']:7.2%}{auroc}")
    if r["rpeaks"]:
        rp = r["rpeaks"]
        lines.append(f"  R peaks ({rp['tolerance_ms']} ms): sensitivity {rp['sensitivity']:.4%}, PPV {rp['ppv']:.4%} "
                     f"({rp['matched']} matched, {rp['missed']} missed, {rp['false']} false of {rp['reference']})")
    st = r["stream"]
    lines.append(f"  alert policy ({_rules(st['policy'])}): "
                 f"{st['alerts']} alerts, {st['false_alerts']} false = {f(st['false_alerts_per_hour'])} per hour "
                 f"over {st['normal_hours']:.2f} h outside non-normal stretches; "
                 f"runs detected {st['detected']}/{st['runs']}; runs of 3+ beats with an alert open "
                 f"{st['runs_3plus']['alerting']}/{st['runs_3plus']['runs']}{_ventricular_runs(st)}")
    lines.append("  " + _quality_summary(st))
    return "\n".join(lines)


def _quality_summary(figures: dict[str, Any]) -> str:
    """e.g. "signal quality: 12 beats bad (artefact 12), 1 signal_quality alert"."""
    bad = {k: v for k, v in figures["bad_quality_beats"].items() if v}
    reasons = f" ({', '.join(f'{k} {v}' for k, v in bad.items())})" if bad else ""
    alerts = figures["signal_quality_alerts"]
    return (f"signal quality: {sum(bad.values())} beats bad{reasons}, "
            f"{alerts} signal_quality alert{'' if alerts == 1 else 's'}")


def _ventricular_runs(figures: dict[str, Any]) -> str:
    """"; ventricular runs (3+ V beats in a row) with an alert open a/b", where there are any."""
    v = figures["ventricular_runs_3plus"]
    return f"; ventricular runs (3+ V beats in a row) {v['alerting']}/{v['runs']}" if v["runs"] else ""


def _most_runs(runs: dict[str, Any]) -> str:
    """The recording holding the most runs of 3+, and the pooled count without it."""
    from trainer.evaluate import without_most  # imported on use, like the rest of evaluate: --help stays fast

    rest = without_most(runs)
    if rest is None:
        return ""
    most = runs["most_runs"]
    return (f" ({most['recording']} holds {most['runs']} of them, {most['alerting']} with an alert open; without it "
            f"{rest[0]}/{rest[1]})")


def _pooled_summary(p: dict[str, Any]) -> str:
    def runs(row: dict[str, Any]) -> str:
        return f"{row['detected']}/{row['runs']}"

    rate = "n/a" if p["false_alerts_per_hour"] is None else f"{p['false_alerts_per_hour']:.2f}"
    by_length = ", ".join(f"{k}: {runs(v)}" for k, v in p["detection_by_length"].items())
    lines = [f"all {p['recordings']} recordings ({p['hours']:.1f} h, {p['beats']} beats): {p['alerts']} alerts, "
             f"{p['false_alerts']} false = {rate} per hour over {p['normal_hours']:.2f} h outside non-normal stretches",
             f"  runs detected by length (beats): {by_length}; runs of 3+ beats with an alert open at one of "
             f"their beats: {p['runs_3plus']['alerting']}/{p['runs_3plus']['runs']}{_most_runs(p['runs_3plus'])}",
             "  ventricular runs (3+ ventricular beats in a row: non-sustained VT or longer) with an alert open: "
             f"{p['ventricular_runs_3plus']['alerting']}/{p['ventricular_runs_3plus']['runs']}",
             "  runs detected by class: " + ", ".join(f"{k} {runs(v)}" for k, v in p["detection_by_class"].items()),
             "  " + _quality_summary(p)]
    for what, key in (("error", "auroc_by_class"), ("policy input", "policy_input_auroc_by_class")):
        for cls, a in p[key].items():
            lines.append(f"  {cls} vs N per-beat AUROC of the {what} over {a['recordings']} recordings with >= "
                         f"{p['min_class_beats']} such beats: median {a['median']:.3f}, min {a['min']:.3f}, "
                         f"below 0.5 in {a['below_chance']}")
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from trainer.pipeline import evaluate_artefact

    given = {k: v for k, v in vars(args).items() if k in DATA_FIELDS}
    result = evaluate_artefact(args.model, subset=args.subset, progress=False, **given)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    elif "recordings" in result:
        print(f"{args.model} ({result['model_version']})"
              + (" -- trained on these recordings: their normal beats include training beats"
                 if result["trained_on_this_data"] else ""))
        for recording in result["recordings"]:
            print(_recording_summary(recording))
        if "pooled" in result:
            print(_pooled_summary(result["pooled"]))
    else:
        print(f"{args.model} ({result['model_version']}), subset {result['subset']}, "
              f"threshold {result['threshold']:.4f}")
        print(_summary(result))
        if "streams" in result:
            print(_streams_summary(result["streams"]))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    described = Artefact.load(args.model).describe()
    if not args.history:
        described.get("training", {}).pop("history", None)
    print(json.dumps(described, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
