"""Text-only training samples that keep a language model's own answers: questions asked of the model before any
multimodal training, and its greedy answers, written as LLaVA conversations without an image.

`openowl data text-answers DIR --model M` writes the questions (`write_questions`), has the model answer them as
`openowl generate --input` does (`DIR/text_answers.jsonl`, resumable), and keeps the finished answers
(`write_samples`).

Stage 2 trains LoRA factors on the LM; mixing these in (owl-small's recipe, docs/owl-small.md) asks the tuned model
to answer text-only questions as the pretrained one did, so that learning about images doesn't overwrite them. The
answers are the model's, right or wrong: the aim is to keep its behaviour, not to teach it facts.
"""

from __future__ import annotations

import json
from pathlib import Path

COUNTRIES = ("France", "Germany", "Italy", "Spain", "Japan", "China", "India", "Brazil", "Canada", "Australia",
             "Egypt", "Russia", "Mexico", "Portugal", "Greece", "Sweden", "Norway", "Poland", "Ireland", "Kenya",
             "Argentina", "Turkey", "Austria", "Belgium", "Netherlands", "Switzerland", "Denmark", "Finland",
             "Thailand", "Vietnam", "Peru", "Chile", "Cuba", "Nigeria", "Morocco", "Iran", "Iraq", "Israel",
             "South Korea", "Indonesia")  # fmt: skip
THINGS = ("the sky", "grass", "snow", "the sun", "a banana", "an apple", "coal", "milk", "a tomato", "the ocean",
          "a lemon", "an orange", "chocolate", "a carrot", "blood")  # fmt: skip
FACTS = (
    "How many days are there in a week?", "How many months are there in a year?", "How many legs does a spider have?",
    "How many legs does a dog have?", "What is the largest planet in the solar system?", "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?", "What do bees make?", "What is the chemical symbol for gold?",
    "What is the freezing point of water in Celsius?", "Which animal is known as the king of the jungle?",
    "What is the largest ocean on Earth?", "How many hours are there in a day?", "What gas do plants breathe in?",
    "What is the opposite of hot?", "What is the opposite of up?", "What language is spoken in Brazil?",
    "Who painted the Mona Lisa?", "What is the tallest mountain in the world?", "What is H2O?",
    "Write a short sentence about a cat.", "Say hello in French.", "Give me a synonym for happy.",
    "What is the square root of 16?", "Name a fruit that is yellow.", "What season comes after winter?",
    "What is the longest river in the world?", "How many continents are there?", "What is the capital city of the "
    "United States?", "What planet do we live on?",
)  # fmt: skip


def text_questions() -> list[str]:
    """The questions: capitals, colours of common things, sums of small numbers, and a set of simple facts."""
    questions = [f"What is the capital of {c}?" for c in COUNTRIES]
    questions += [f"What color is {t}?" for t in THINGS]
    questions += [f"What is {a} plus {b}?" for a in range(1, 10, 2) for b in range(2, 10, 3)]
    return questions + list(FACTS)


QUESTIONS, ANSWERS, SAMPLES = "text_questions.jsonl", "text_answers.jsonl", "text_train.jsonl"


def write_questions(out: Path) -> Path:
    """`out/text_questions.jsonl`: `text_questions()` in the questions format of `openowl generate --input`."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / QUESTIONS
    with open(path, "w") as f:
        f.writelines(json.dumps({"id": f"text-{n}", "question": q}) + "\n" for n, q in enumerate(text_questions()))
    return path


def write_samples(out: Path) -> dict[str, int]:
    """`out/text_train.jsonl`: each answer of `out/text_answers.jsonl` that finished, with its question. An answer
    cut at the token limit (`finish_reason: length`) is left out: cut short, it would teach the model to stop
    mid-sentence.

    Returns:
        the number of samples written, and of answers left out.
    """
    rows = [json.loads(line) for line in (out / ANSWERS).read_text().splitlines() if line.strip()]
    kept = [row for row in rows if row.get("finish_reason") == "stop"]
    with open(out / SAMPLES, "w") as f:
        for row in kept:
            turns = [{"from": "human", "value": row["question"]}, {"from": "gpt", "value": row["answer"].strip()}]
            f.write(json.dumps({"id": row["id"], "conversations": turns}) + "\n")
    return {SAMPLES: len(kept), "left out (cut at the token limit)": len(rows) - len(kept)}
