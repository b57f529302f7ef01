"""The evaluation charts written into every eval_dir, drawn with matplotlib (Agg backend, imported only here, inside
the functions that draw, so that nothing else pays for it):

- chain_success.png: the five chain success rates (the share of sequences with at least i tasks in a row), with
  the average successful sequence length;
- task_success.png: per task, successes / times it was asked for, as CALVIN prints its task_info.
"""
from __future__ import annotations

from typing import Any

CHAIN_SIZE = (6.4, 4.0)  # inches; at DPI pixels: 640 x 400
DPI = 100
TASK_ROW_INCHES = 0.3  # task_success.png grows with the number of tasks
TASK_MARGIN_INCHES = 1.3
TASK_WIDTH = 8.0
BAR_COLOR = "#3465a4"


def task_chart_size(n_tasks: int) -> tuple[int, int]:
    """(width, height) in pixels of task_success.png for n_tasks tasks."""
    return int(TASK_WIDTH * DPI), int(round((TASK_MARGIN_INCHES + TASK_ROW_INCHES * max(n_tasks, 1)) * DPI))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def draw_chain_success(path: str, summary: dict[str, Any]) -> None:
    """Bar chart of summary['chain_sr'] ('1'..'5' -> rate)."""
    plt = _pyplot()
    rates = [summary["chain_sr"][str(i)] * 100 for i in range(1, 6)]
    fig, ax = plt.subplots(figsize=CHAIN_SIZE, dpi=DPI)
    bars = ax.bar(range(1, 6), rates, color=BAR_COLOR, width=0.6)
    ax.bar_label(bars, labels=[f"{r:.1f}%" for r in rates], padding=2)
    ax.set_xticks(range(1, 6))
    ax.set_ylim(0, 110)
    ax.set_yticks(range(0, 101, 25))
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0f}%")
    ax.set_xlabel("tasks completed in a row")
    ax.set_ylabel("share of sequences")
    ax.set_title(f"CALVIN chain success \N{EN DASH} {summary['num_sequences']} sequences, "
                 f"avg. length {summary['avg_seq_len']:.2f}")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def draw_task_success(path: str, summary: dict[str, Any]) -> None:
    """Horizontal bars of each task's success rate, labelled 'success / total', tasks in alphabetical order."""
    plt = _pyplot()
    info = dict(sorted(summary["task_info"].items()))
    names = list(info) or ["(no task evaluated)"]
    rates = [100 * v["success"] / v["total"] if v["total"] else 0.0 for v in info.values()] or [0.0]
    width, height = task_chart_size(len(names))
    fig, ax = plt.subplots(figsize=(width / DPI, height / DPI), dpi=DPI)
    bars = ax.barh(range(len(names)), rates, color=BAR_COLOR, height=0.6)
    ax.bar_label(bars, labels=[f"{v['success']} / {v['total']}  ({r:.0f}%)" for v, r in zip(info.values(), rates)],
                 padding=3)
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(len(names) - 0.5, -0.5)  # first task on top, no empty rows
    ax.set_xlim(0, 125)
    ax.set_xticks(range(0, 101, 25))
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:.0f}%")
    ax.set_xlabel("success rate (successes / times asked)")
    ax.set_title(f"Success per task \N{EN DASH} {summary['num_sequences']} sequences")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
