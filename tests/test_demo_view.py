"""The demo's live alert table (monitor.tools.demo): an alert opened by a fast run says so."""

from __future__ import annotations

from monitor.stream.wire import AlertRecord
from monitor.tools.demo import state_cell


def alert(state: str, trigger: str | None) -> AlertRecord:
    return AlertRecord(alert_id="s:0:x@0:0", sensor_id="s", state=state, window_start_seq=0,  # type: ignore[arg-type]
                       window_end_seq=140, score=0.5, threshold=0.4, model_version="m", detected_at=0.0,
                       trigger=trigger)  # type: ignore[arg-type]


def test_a_fast_run_alert_is_marked_in_the_table_and_the_others_are_not():
    assert "fast run" in state_cell(alert("firing", "fast_run"))
    assert "fast run" not in state_cell(alert("firing", "aggregate"))
    assert state_cell(alert("resolved", None)) == "[green]resolved[/]"
