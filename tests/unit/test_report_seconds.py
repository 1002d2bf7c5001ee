"""The iteration's `seconds` counts overlapping stages once (the checkpoint the last update writes
inside its training stage's time is not added a second time)."""

from spark_core.stages.report import _stage_seconds


def _m(start: str, end: str, seconds: float) -> dict:
    return {"started_at": f"2026-12-01T14:{start}+00:00", "written_at": f"2026-12-01T14:{end}+00:00",
            "seconds": seconds}


def test_overlapping_stages_count_once_and_gaps_are_not_counted() -> None:
    manifests = [
        _m("28:37", "28:55", 18.0),           # samples
        _m("30:30", "32:37", 127.0),          # train/phase=reward
        _m("30:30", "32:37", 123.0),          # the checkpoint written by that update
        _m("29:00", "29:10", 10.0),           # another stage, after a 5 s gap
    ]
    assert _stage_seconds(manifests) == 18.0 + 10.0 + 127.0


def test_manifests_without_times_fall_back_to_their_seconds() -> None:
    assert _stage_seconds([{"seconds": 2.5, "write_seconds": 0.5}, _m("00:00", "00:04", 4.0)]) == 7.0
