"""OwlEval outputs: our answers in the upstream answer format, and an HTML report for rating them by hand.

The report shows, per question, the image, our answer and the answers the six shipped systems gave (mPLUG-Owl 7B,
MiniGPT-4, LLaVA, BLIP-2, OpenFlamingo, MM-REACT), each with A/B/C/D buttons (A best ... D worst, as upstream
rates). The page tallies the ratings per system (all / single-turn / multi-turn) as they are clicked, keeps them in
the browser, and saves them as JSON; `openowl eval owleval --ratings FILE` puts a saved file's tally in the results.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path

from openowl.data.jsonl import read_rows
from openowl.eval.items import Item
from openowl.eval.owleval_data import owleval_dir

GRADES = "ABCD"
SPLITS = ("all", "single_turn", "multi_turn")  # the tally's question sets: all, and by upstream category


def upstream_answers(items: Sequence[Item], records: dict[str, dict], model_id: str) -> list[dict]:
    """Our answers as upstream's `answer/*.jsonl` rows, in question_id order."""
    return [
        {
            "image": it.meta["image"],
            "question_id": int(it.id),
            "question": it.question,
            "answer": records[it.id]["answer"],
            "model_id": model_id,
        }
        for it in sorted(items, key=lambda it: int(it.id))
    ]


def shipped_answers(folder: Path) -> dict[str, dict[int, str]]:
    """{system: {question_id: answer}} from the OwlEval folder's `answer/*.jsonl`, systems named by model_id."""
    systems = {}
    for path in sorted((folder / "answer").glob("*.jsonl")):
        rows = [row for _, row in read_rows(path)]
        if rows:
            systems[str(rows[0].get("model_id", path.stem))] = {int(r["question_id"]): r["answer"] for r in rows}
    return systems


def tally(ratings: dict[str, dict[str, str]], items: Sequence[Item]) -> dict[str, dict[str, dict[str, int]]]:
    """{system: {"all" | "single_turn" | "multi_turn": {"A": n, "B": n, "C": n, "D": n, "A+B": n}}}.

    Args:
        ratings: {system: {question_id: "A" | "B" | "C" | "D"}}, as the report saves them.

    Raises:
        ValueError: a grade other than A-D.
    """
    kinds = {it.id: it.meta["category"].split(",") for it in items}
    out = {}
    for system, grades in ratings.items():
        counts = {split: dict.fromkeys([*GRADES, "A+B"], 0) for split in SPLITS}
        for qid, grade in grades.items():
            if grade not in GRADES:
                raise ValueError(f"{system}, question {qid}: rating {grade!r} is not one of A, B, C, D")
            for split in ("all", *kinds.get(str(qid), [])):
                if split in counts:
                    counts[split][grade] += 1
                    counts[split]["A+B"] += grade in "AB"
        out[system] = counts
    return out


def _thumbnail(path: Path, size: int = 360) -> str:
    from PIL import Image

    from openowl.processing import load_image

    image = load_image(path)
    image.thumbnail((size, size), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def render_report(items: Sequence[Item], answers: dict[str, dict[int, str]], ratings: dict | None = None) -> str:
    """The HTML page: a tally table, then per question its image and every system's answer with rating buttons.

    Args:
        answers: {system: {question_id: answer}}, ours first.
        ratings: {system: {question_id: grade}} to show checked (and tallied) from the start.
    """
    ratings = ratings or {}
    systems = list(answers)
    thumbs = {}
    blocks = []
    for it in sorted(items, key=lambda it: int(it.id)):
        qid = int(it.id)
        image = Path(it.meta["path"])
        thumbs.setdefault(image, _thumbnail(image))
        rows = []
        for s, system in enumerate(systems):
            chosen = ratings.get(system, {}).get(str(qid))
            buttons = "".join(
                f'<label><input type="radio" name="q{qid}-s{s}" value="{g}" data-system="{html.escape(system)}" '
                f'data-question="{qid}" data-kinds="{it.meta["category"]}"{" checked" if g == chosen else ""}>{g}'
                "</label>"
                for g in GRADES
            )
            answer = html.escape(answers[system].get(qid, "(no answer)"))
            rows.append(
                f'<tr><th>{html.escape(system)}</th><td class="answer">{answer}</td>'
                f'<td class="rate">{buttons}</td></tr>'
            )
        blocks.append(
            f"<section><h2>Question {qid} <small>{html.escape(it.meta['image'])} · abilities {it.meta['ability']} "
            f"· {it.meta['category'].replace(',', ', ').replace('_', '-')}</small></h2>"
            f'<img src="{thumbs[image]}" alt="{html.escape(it.meta["image"])}">'
            f'<p class="question">{html.escape(it.question)}</p><table>{"".join(rows)}</table></section>'
        )
    tally_html = _tally_table(tally(ratings, items), systems)
    return _PAGE.format(systems=json.dumps(systems), tally=tally_html, blocks="\n".join(blocks))


def _tally_table(counts: dict, systems: Sequence[str]) -> str:
    head = "".join(f"<th>{split.replace('_', '-')} {g}</th>" for split in SPLITS for g in [*GRADES, "A+B"])
    rows = []
    for system in systems:
        c = counts.get(system, {split: dict.fromkeys([*GRADES, "A+B"], 0) for split in SPLITS})
        cells = "".join(f"<td>{c[split][g]}</td>" for split in SPLITS for g in [*GRADES, "A+B"])
        rows.append(f"<tr><th>{html.escape(system)}</th>{cells}</tr>")
    return f'<table id="tally"><tr><th>system</th>{head}</tr>{"".join(rows)}</table>'


def write_owleval(
    items: Sequence[Item],
    records: dict[str, dict],
    output: Path,
    model_id: str,
    data: str | None = None,
    ratings: dict | None = None,
) -> Path:
    """Write `<model_id>_answer.jsonl` (upstream format) and `report.html` into `output`; returns the report."""
    ours = upstream_answers(items, records, model_id)
    (output / f"{model_id}_answer.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ours))
    answers = {model_id: {r["question_id"]: r["answer"] for r in ours}} | shipped_answers(owleval_dir(data))
    report = output / "report.html"
    report.write_text(render_report(items, answers, ratings))
    return report


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>OwlEval report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1200px; }}
section {{ border-top: 1px solid #ccc; padding: 1em 0; }}
img {{ max-width: 360px; max-height: 360px; display: block; }}
.question {{ font-weight: bold; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ddd; padding: 4px 8px; vertical-align: top; text-align: left; }}
.answer {{ white-space: pre-wrap; max-width: 800px; }}
.rate label {{ margin-right: 6px; white-space: nowrap; }}
#tally td {{ text-align: right; }}
</style></head><body>
<h1>OwlEval</h1>
<p>Rate each answer A (best) … D (worst). Ratings are kept in this browser; save them as JSON and pass the file to
<code>openowl eval owleval --ratings FILE</code> to put the tally in the results.</p>
<p><button id="save">Save ratings (JSON)</button> <label>Load ratings <input type="file" id="load"></label></p>
{tally}
{blocks}
<script>
const SYSTEMS = {systems};
const KEY = "openowl-owleval:" + location.pathname;
const GRADES = ["A", "B", "C", "D"], SPLITS = ["all", "single_turn", "multi_turn"];
function ratings() {{
  const out = {{}};
  for (const input of document.querySelectorAll("input[type=radio]:checked")) {{
    (out[input.dataset.system] ||= {{}})[input.dataset.question] = input.value;
  }}
  return out;
}}
function apply(saved) {{
  for (const input of document.querySelectorAll("input[type=radio]")) {{
    const grade = (saved[input.dataset.system] || {{}})[input.dataset.question];
    if (grade) input.checked = input.value === grade;
  }}
}}
function retally() {{
  const rows = document.querySelectorAll("#tally tr");
  SYSTEMS.forEach((system, i) => {{
    const counts = {{}};
    for (const split of SPLITS) counts[split] = {{A: 0, B: 0, C: 0, D: 0, "A+B": 0}};
    for (const input of document.querySelectorAll("input[type=radio]:checked")) {{
      if (input.dataset.system !== system) continue;
      for (const split of ["all", ...input.dataset.kinds.split(",")]) {{
        if (!counts[split]) continue;
        counts[split][input.value] += 1;
        if ("AB".includes(input.value)) counts[split]["A+B"] += 1;
      }}
    }}
    const cells = rows[i + 1].querySelectorAll("td");
    let c = 0;
    for (const split of SPLITS) for (const g of [...GRADES, "A+B"]) cells[c++].textContent = counts[split][g];
  }});
}}
document.addEventListener("change", (e) => {{
  if (e.target.type === "radio") {{ localStorage.setItem(KEY, JSON.stringify(ratings())); retally(); }}
}});
document.getElementById("save").onclick = () => {{
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([JSON.stringify(ratings(), null, 1)], {{type: "application/json"}}));
  a.download = "owleval_ratings.json";
  a.click();
}};
document.getElementById("load").onchange = async (e) => {{
  apply(JSON.parse(await e.target.files[0].text()));
  localStorage.setItem(KEY, JSON.stringify(ratings()));
  retally();
}};
apply(JSON.parse(localStorage.getItem(KEY) || "{{}}"));
retally();
</script></body></html>
"""
