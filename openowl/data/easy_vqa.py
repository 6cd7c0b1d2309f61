"""easy-vqa (the `easy-vqa` package: 64×64 pictures of one coloured shape): its vocabulary, and the training files
of owl-small's recipe (`openowl data easy-vqa DIR`)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

SEED = 0


SHAPES = ("circle", "rectangle", "triangle")


def write_training_data(out: Path, questions_per_image: int | None = None, yes_no_per_image: int = 6) -> dict[str, int]:
    """The easy-vqa training files of the recipe's runs, with absolute image paths:

    - `captions_train.jsonl` (stage 1): one caption per training image, "a red triangle", from what its questions
      and answers say about it (colour and shape; "a red shape" / "a triangle" when one of them is never said);
    - `questions_train.jsonl` (stage 2): the questions as one-turn LLaVA conversations, at most
      `questions_per_image` per image (all by default), in the package's order;
    - `yes_no_train.jsonl` (stage 2b): the split's shape and colour questions, and `yes_no_per_image` yes/no
      questions per image whose colour and shape are both known, in the split's own 16 wordings. Half ask about
      what the image shows, half about another colour or shape, each negated or not at random: the answer can't be
      told from the question alone. (The split's own yes/no questions mostly ask about absent things, 23,258 of
      28,407, so a model trained on them alone answers from the question; see docs/owl-small.md, The recipe.)
    """
    import easy_vqa

    texts, answers, image_ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    colours = sorted(set(easy_vqa.get_answers()) - set(SHAPES) - {"yes", "no"})
    facts: dict[int, dict[str, str]] = {}
    for text, answer, image in zip(texts, answers, image_ids, strict=True):
        facts.setdefault(image, {}).update(_facts(text, answer, colours))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "captions_train.jsonl", "w") as f:
        for image in sorted(facts):
            known = facts[image]
            caption = f"a {known.get('colour', '')} {known.get('shape', 'shape')}".replace("  ", " ")
            f.write(json.dumps({"id": f"caption-{image}", "image": str(paths[image]), "caption": caption}) + "\n")

    def write(name: str, rows: list[tuple[str, int, str, str]]) -> int:
        with open(out / name, "w") as f:
            for sample_id, image, text, answer in rows:
                turns = [{"from": "human", "value": f"<image>\n{text}"}, {"from": "gpt", "value": answer}]
                f.write(json.dumps({"id": sample_id, "image": str(paths[image]), "conversations": turns}) + "\n")
        return len(rows)

    counts: dict[int, int] = {}
    questions = []
    for n, (text, answer, image) in enumerate(zip(texts, answers, image_ids, strict=True)):
        if questions_per_image is None or counts.get(image, 0) < questions_per_image:
            counts[image] = counts.get(image, 0) + 1
            questions.append((f"q-{n}", image, text, answer))
    rng = random.Random(SEED)
    yes_no = [row for row in questions if row[3] not in ("yes", "no")]
    yes_no += _yes_no_questions(texts, answers, facts, colours, yes_no_per_image, rng)
    rng.shuffle(yes_no)
    return {
        "captions": len(facts),
        "questions": write("questions_train.jsonl", questions),
        "yes_no": write("yes_no_train.jsonl", yes_no),
    }


def _yes_no_questions(
    texts: list[str],
    answers: list[str],
    facts: dict[int, dict[str, str]],
    colours: list[str],
    per_image: int,
    rng: random.Random,
) -> list[tuple[str, int, str, str]]:
    """`per_image` seeded yes/no questions about each image whose colour and shape are known (see
    `write_training_data`), in the wordings of the split's own yes/no questions."""
    wordings: dict[str, set[str]] = {"colour": set(), "shape": set()}
    for text, answer in zip(texts, answers, strict=True):
        if answer in ("yes", "no"):
            for word in re.findall(r"[a-z]+", text):
                if word in colours or word in SHAPES:
                    wordings["colour" if word in colours else "shape"].add(re.sub(rf"\b{word}\b", "{}", text))
    ordered = {kind: sorted(found) for kind, found in wordings.items()}
    values = {"colour": colours, "shape": list(SHAPES)}
    rows = []
    for image, known in sorted(facts.items()):
        if known.keys() != {"colour", "shape"}:
            continue
        for k in range(per_image):
            kind = rng.choice(("colour", "shape"))
            shown = rng.random() < 0.5
            value = known[kind] if shown else rng.choice([v for v in values[kind] if v != known[kind]])
            text = rng.choice(ordered[kind]).format(value)
            rows.append((f"yn-{image}-{k}", image, text, "yes" if shown != _negated(text) else "no"))
    return rows


def _negated(question: str) -> bool:
    return bool(set(re.findall(r"[a-z]+", question.lower())) & {"not", "no"})


def _asks_absent(question: str, answer: str) -> bool:
    """A yes/no question about a colour or shape the image doesn't show ("is there a red shape?" -> "no")."""
    return answer in ("yes", "no") and (answer == "yes") == _negated(question)


def _facts(question: str, answer: str, colours: set[str]) -> dict[str, str]:
    """What one question and its answer say about the image's colour and shape."""
    words = set(re.findall(r"[a-z]+", question.lower()))
    colour = next((w for w in words if w in colours), None)
    shape = next((w for w in words if w in SHAPES), None)
    if answer in SHAPES:
        return {"shape": answer, **({"colour": colour} if colour else {})}
    if answer in colours:
        return {"colour": answer, **({"shape": shape} if shape else {})}
    if _asks_absent(question, answer):
        return {}
    return {**({"colour": colour} if colour else {}), **({"shape": shape} if shape else {})}


def question_type(answer: str) -> str:
    """easy-vqa's question type, read off the answer: yes/no, shape or colour."""
    return "yes/no" if answer in ("yes", "no") else "shape" if answer in SHAPES else "colour"
