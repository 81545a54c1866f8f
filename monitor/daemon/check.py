"""`ecg-monitor check`: validate the settings, the model (it must load and score a synthetic window
to a finite number) and broker connectivity; print a summary.

Exit code 0 when everything the daemon needs is in place, 1 when something is wrong (each
problem is printed), 2 when the settings themselves are invalid. Nothing is created or changed.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from monitor.daemon.settings import MonitorSettings, load_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--env-file", default=".env", help="dotenv file read after the environment")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the broker")
    parser.add_argument("--skip-broker", action="store_true", help="check settings and model only")


def main(args: argparse.Namespace) -> int:
    settings = load_settings(args.env_file)
    if settings is None:
        return 2
    summary: dict[str, Any] = {"settings": _settings_summary(settings), "problems": []}
    summary["model"] = check_model(settings, summary["problems"])
    if not args.skip_broker:
        summary["broker"] = check_broker(settings, args.timeout, summary["problems"])
    summary["ok"] = not summary["problems"]
    print(json.dumps(summary, indent=2, default=str) if args.json else _text(summary))
    return 0 if summary["ok"] else 1


def _settings_summary(settings: MonitorSettings) -> dict[str, Any]:
    """Every setting; secrets stay masked (SecretStr prints as '**********')."""
    return {name: (str(value) if value is not None else None) for name, value in settings}


def check_model(settings: MonitorSettings, problems: list[str]) -> dict[str, Any] | None:
    from monitor.core.scoring import ArtefactError, Scorer

    try:
        scorer = Scorer.from_file(settings.model_file, device=settings.device, max_batch=settings.max_batch)
        warm_up_score = scorer.warm_up()
    except (ArtefactError, RuntimeError) as exc:
        problems.append(f"model: {exc}")
        return None
    hop = settings.hop or scorer.window_length
    return {"path": str(settings.model_file), "model_version": scorer.model_version,
            "window_length": scorer.window_length, "hop": hop, "threshold": scorer.threshold,
            "reduction": scorer.artefact.reduction, "device": str(scorer.device), "warm_up_score": warm_up_score}


def check_broker(settings: MonitorSettings, timeout_s: float, problems: list[str]) -> dict[str, Any] | None:
    """Connect, list topics and the partitions of each topic the daemon uses."""
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    try:
        consumer = KafkaConsumer(**settings.kafka_common(), request_timeout_ms=int(timeout_s * 1000),
                                 bootstrap_timeout_ms=int(timeout_s * 1000))
    except KafkaError as exc:
        problems.append(f"broker {settings.bootstrap_servers}: {type(exc).__name__}: {exc}")
        return None
    try:
        existing = consumer.topics()
        topics = {}
        for role in ("input_topic", "alerts_topic", "dlq_topic", "scores_topic", "state_topic"):
            name = getattr(settings, role)
            if not name:
                continue
            partitions = consumer.partitions_for_topic(name) if name in existing else None
            topics[role] = {"name": name, "partitions": len(partitions) if partitions else None}
            if not partitions:
                problems.append(f"topic {name!r} ({role}) does not exist; create it (operators own topics)")
        state, inputs = topics["state_topic"]["partitions"], topics["input_topic"]["partitions"]
        if state and inputs and state != inputs:  # the daemon refuses to start then
            problems.append(f"the state topic {settings.state_topic!r} has {state} partitions, the input topic "
                            f"{inputs}: they must be equal (per-sensor state is partitioned like the input)")
        return {"bootstrap_servers": settings.bootstrap_servers, "topics": topics}
    except KafkaError as exc:
        problems.append(f"broker {settings.bootstrap_servers}: {type(exc).__name__}: {exc}")
        return None
    finally:
        consumer.close()


def _text(summary: dict[str, Any]) -> str:
    lines = ["settings:"]
    lines += [f"  {k} = {v}" for k, v in summary["settings"].items()]
    if summary.get("model"):
        lines.append("model:")
        lines += [f"  {k} = {v}" for k, v in summary["model"].items()]
    if summary.get("broker"):
        lines.append(f"broker: {summary['broker']['bootstrap_servers']} reachable")
        lines += [f"  {role}: {t['name']} ({t['partitions'] or 'missing'} partitions)"
                  for role, t in summary["broker"]["topics"].items()]
    lines += [f"PROBLEM: {p}" for p in summary["problems"]]
    lines.append("OK" if summary["ok"] else f"{len(summary['problems'])} problem(s)")
    return "\n".join(lines)
