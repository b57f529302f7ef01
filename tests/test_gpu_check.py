"""bench/gpu_check.py's report logic (the check itself runs on a GPU machine or with --dry-run, never in CI): how a
step's end becomes its entry, what makes a report invalid, the cross-step finding and the Markdown."""
from __future__ import annotations

from bench.gpu_check import STEPS, build_report, findings, markdown, skipped_record, step_record, validate

OK = {"status": "ok", "reason": "", "rows": [{"batch": 8, "samples_per_s": 40.0}], "notes": ["bf16"]}


def _records(**overrides: dict) -> list[dict]:
    return [overrides.get(s.name) or step_record(s, OK, 0, 1.0, 60) for s in STEPS]


def test_a_step_becomes_ok_skipped_or_failed_with_a_reason():
    step = STEPS[2]
    assert step_record(step, OK, 0, 3.0, 60)["status"] == "ok"
    skipped = step_record(step, {"status": "skipped", "reason": "torch.cuda is not available", "rows": []}, 0, 1, 60)
    assert (skipped["status"], skipped["reason"]) == ("skipped", "torch.cuda is not available")
    running = {"status": "running", "reason": "", "rows": [{"batch": 8}]}
    stopped = step_record(step, running, None, 60.2, 60)
    assert stopped["status"] == "failed" and "time limit of 60 s" in stopped["reason"]
    assert stopped["rows"] == [{"batch": 8}]  # the rows finished before the stop are kept
    crashed = step_record(step, running, 1, 2.0, 60, "line\nRuntimeError: CUDA error")
    assert crashed["status"] == "failed" and "RuntimeError: CUDA error" in crashed["reason"]
    assert step_record(step, None, -9, 2.0, 60)["status"] == "failed"  # killed before writing anything
    assert step_record(step, OK, 1, 2.0, 60)["status"] == "failed"  # said ok but exited with an error


def test_validation_finds_missing_steps_and_reasons():
    report = build_report(_records(), "dry-run", 0.0, [], [])
    assert validate(report) == [] and report["summary"] == {"ok": len(STEPS), "skipped": 0, "failed": 0}
    report["steps"] = report["steps"][1:] + [skipped_record(STEPS[1], "")]
    problems = validate(report)
    assert any(STEPS[0].name in p and "0 entries" in p for p in problems)
    assert any(STEPS[1].name in p and "2 entries" in p for p in problems)
    assert any("skipped without a reason" in p for p in problems)
    report["steps"][0]["status"] = "done"
    assert any("'done' is not one of" in p for p in validate(report))


def test_loader_finding_and_markdown():
    data = step_record(STEPS[3], {**OK, "rows": [{"workers": 16, "samples_per_s": 30.0}]}, 0, 1, 60)
    assert "may starve the GPU" in findings(_records(data=data))[0]
    assert "not measured" in findings(_records(data=skipped_record(STEPS[3], "no lmdb")))[0]
    report = build_report(_records(data=data), "gpu", 0.0, ["wheels: 3 installed"], [])
    text = markdown(report)
    assert all(f"| {s.name} | ok |" in text for s in STEPS) and "wheels: 3 installed" in text
    assert "| batch | samples_per_s |" in text and "- bf16" in text
