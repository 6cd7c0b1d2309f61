"""Scores from cached answers, and the results files: results.json, results.md, and side-by-side comparisons.

Fractions (accuracy, precision, ...) are stored as fractions and shown as percentages; MME's scores are in its
own points (acc % + acc+ %), BLEU-4 in [0, 1], CIDEr as pycocoevalcap gives it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from openowl.eval import metrics
from openowl.eval.items import Item, Task

FRACTIONS = {
    "accuracy",
    "precision",
    "recall",
    "f1",
    "yes_ratio",
    "all_accuracy",
    "question_pair_accuracy",
    "figure_accuracy",
    "first_rotation_accuracy",
    "unparsed",
}

MME_POINTS = {"perception", "cognition", "acc", "acc+", "score"}


def score(task: Task, units: Sequence, answers: dict[str, dict], method: str = "generate") -> dict:
    """The task's scores over `units` (see runner.Unit), each of which must have its answer in `answers`.

    Returns:
        {"task", "metric", "n", "scores", "breakdown": {category: {"n", ...}}, "baseline"?: {...}}
    """
    items = list({id(u.item): u.item for u in units}.values())
    missing = [u.id for u in units if u.id not in answers]
    if missing:
        raise ValueError(f"{len(missing)} answers are missing, e.g. {missing[0]}")
    predictions = {u.id: answers[u.id]["answer"] for u in units}
    out = {"task": task.name, "metric": task.metric, "n": len(items)}
    if task.metric == "choice":
        out["method"] = method
    scorer = _SCORERS[task.metric]
    out.update(scorer(items, units, predictions))
    return out


def _by_category(items: Sequence[Item], values: dict[str, float], name: str = "accuracy") -> dict:
    groups: dict[str, list[float]] = defaultdict(list)
    for it in items:
        if "category" in it.meta:
            groups[str(it.meta["category"])].append(values[it.id])
    return {k: {"n": len(v), name: sum(v) / len(v)} for k, v in sorted(groups.items())}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _exact(items, units, predictions):
    correct = {it.id: float(metrics.exact_match(predictions[it.id], it.answers)) for it in items}
    always_yes = {it.id: float(metrics.exact_match("yes", it.answers)) for it in items}
    return {
        "scores": {"accuracy": _mean(correct.values())},
        "breakdown": _by_category(items, correct),
        "baseline": {
            "name": 'always "yes"',
            "scores": {"accuracy": _mean(always_yes.values())},
            "breakdown": _by_category(items, always_yes),
        },
    }


def _vqa(items, units, predictions):
    accuracy = {it.id: metrics.vqa_accuracy(predictions[it.id], it.answers) for it in items}
    return {"scores": {"accuracy": _mean(accuracy.values())}, "breakdown": _by_category(items, accuracy)}


def _yes_no(items, units, predictions, parse=metrics.parse_yes_no):
    parsed = {it.id: parse(predictions[it.id]) for it in items}
    truth = {it.id: it.answers[0].strip().lower() for it in items}
    groups: dict[str, list[Item]] = defaultdict(list)
    for it in items:
        if "category" in it.meta:
            groups[str(it.meta["category"])].append(it)

    def scores(subset, pred=None):
        return metrics.binary_scores([pred or parsed[it.id] for it in subset], [truth[it.id] for it in subset])

    return {
        "scores": scores(items),
        "breakdown": {k: {"n": len(v), **scores(v)} for k, v in sorted(groups.items())},
        "baseline": {
            "name": 'always "yes"',
            "scores": {"accuracy": scores(items, "yes")["accuracy"]},
            "breakdown": {
                k: {"n": len(v), "accuracy": scores(v, "yes")["accuracy"]} for k, v in sorted(groups.items())
            },
        },
    }


def _pope(items, units, predictions):
    return _yes_no(items, units, predictions, parse=metrics.parse_pope)


def _mme(items, units, predictions):
    records = []
    for it in items:
        correct = metrics.parse_yes_no(predictions[it.id]) == it.answers[0].strip().lower()
        records.append((str(it.meta.get("category", "all")), str(it.meta.get("pair", it.id)), correct))
    table = metrics.mme_scores(records)
    subtasks = {k: v for k, v in table.items() if isinstance(v, dict)}
    counts = defaultdict(int)
    for task, _, _ in records:
        counts[task] += 1
    return {
        "scores": {
            "perception": table["perception"],
            "cognition": table["cognition"],
            "accuracy": _mean(c for _, _, c in records),
        },
        "breakdown": {k: {"n": counts[k], **v} for k, v in subtasks.items()},
    }


def _hallusion(items, units, predictions):
    records = [
        {
            **{k: it.meta[k] for k in ("category", "subcategory", "set_id", "figure_id", "question_id")},
            "truth": it.answers[0].strip().lower(),
            "prediction": metrics.parse_yes_no(predictions[it.id]),
        }
        for it in items
    ]
    by_category = defaultdict(list)
    for r in records:
        by_category[r["category"]].append(r)
    return {
        "scores": metrics.hallusion_scores(records),
        "breakdown": {k: {"n": len(v), **metrics.hallusion_scores(v)} for k, v in sorted(by_category.items())},
    }


def _choice(items, units, predictions):
    picked = {u.id: metrics.parse_choice(predictions[u.id], u.options) for u in units}  # "B" or a longer answer
    by_item: dict[str, list] = defaultdict(list)
    for u in units:
        by_item[u.item.id].append((picked[u.id], u.answer_index))
    correct = {k: float(all(p == a for p, a in v)) for k, v in by_item.items()}  # every rotation right
    scores = {"accuracy": _mean(correct.values())}
    if any(len(v) > 1 for v in by_item.values()):
        scores["first_rotation_accuracy"] = _mean(v[0][0] == v[0][1] for v in by_item.values())
    scores["unparsed"] = _mean(p is None for p in picked.values())
    return {"scores": scores, "breakdown": _by_category(items, correct)}


def _caption(items, units, predictions):
    scores = metrics.caption_scores({it.id: predictions[it.id] for it in items}, {it.id: it.answers for it in items})
    return {"scores": scores, "breakdown": {}}


def _none(items, units, predictions):
    return {"scores": {"answered": len(items)}, "breakdown": {}}


_SCORERS = {
    "exact": _exact,
    "vqa": _vqa,
    "yes-no": _yes_no,
    "pope": _pope,
    "mme": _mme,
    "hallusion": _hallusion,
    "choice": _choice,
    "caption": _caption,
    "none": _none,
}


# --- files ---------------------------------------------------------------------------------------


def fmt(key: str, value) -> str:
    if isinstance(value, float):
        if key in FRACTIONS:
            return f"{100 * value:.1f} %"
        return f"{value:.2f}" if key in MME_POINTS else f"{value:.4f}"
    return str(value)


def markdown(results: dict) -> str:
    """A table: the overall scores, then one row per category; the baseline's main score in its own column."""
    rows = [("all", {"n": results["n"], **results["scores"]})]
    rows += [(name, values) for name, values in results.get("breakdown", {}).items()]
    columns = []
    for _, values in rows:
        columns += [k for k in values if k not in columns]
    baseline = results.get("baseline")
    header = ["", *columns]
    if baseline:
        main = next(iter(baseline["scores"]))
        header.append(f"{baseline['name']} {main}")
    lines = [
        f"## {results['task']} — {results.get('model', '')}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, values in rows:
        cells = [name, *(fmt(k, values[k]) if k in values else "" for k in columns)]
        if baseline:
            source = baseline["scores"] if name == "all" else baseline["breakdown"].get(name, {})
            cells.append(fmt(main, source[main]) if main in source else "")
        lines.append("| " + " | ".join(cells) + " |")
    if results.get("ratings"):
        lines += ["", *_ratings_table(results["ratings"])]
    return "\n".join(lines) + "\n"


def _ratings_table(counts: dict) -> list[str]:
    """OwlEval's hand ratings per system: A / B / C / D and A+B, over all, single-turn and multi-turn questions."""
    parts = ("all", "single_turn", "multi_turn")
    lines = [
        "| system | " + " | ".join(f"{p.replace('_', '-')} A/B/C/D (A+B)" for p in parts) + " |",
        "|" + "---|" * (len(parts) + 1),
    ]
    for system, c in counts.items():
        cells = ["/".join(str(c[p][g]) for g in "ABCD") + f" ({c[p]['A+B']})" for p in parts]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return lines


def write_results(results: dict, output: Path) -> None:
    (output / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    (output / "results.md").write_text(markdown(results))


def compare(folders: Sequence[str | Path]) -> str:
    """One markdown table per task, one row per model, from every results.json under `folders`."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for folder in folders:
        for path in sorted(Path(folder).rglob("results.json")):
            by_task[json.loads(path.read_text())["task"]].append(json.loads(path.read_text()))
    if not by_task:
        raise FileNotFoundError(f"no results.json under {', '.join(map(str, folders))}")
    out = []
    for task, runs in sorted(by_task.items()):
        columns = []
        for r in runs:
            columns += [k for k in r["scores"] if k not in columns]
        lines = [f"## {task}", "", "| model | n | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 2)]
        for r in runs:
            cells = [fmt(k, r["scores"][k]) if k in r["scores"] else "" for k in columns]
            lines.append(f"| {r.get('model', '?')} | {r['n']} | " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"
