"""Benchmark metrics as pure functions over answer strings: no model, no files.

- Short answers: `normalize_answer` + `exact_match`; VQAv2 accuracy with the official answer normalization.
- Yes / no: `parse_yes_no` (MME's rule), `parse_pope` (POPE's), `binary_scores` (POPE: accuracy, precision,
  recall, F1, yes ratio), `mme_scores` (acc + acc+ per subtask), `hallusion_scores` (all-question, question-pair
  and figure accuracy).
- Multiple choice: `parse_choice` (the letter a generated answer names), `circular_options` (MMBench's
  CircularEval: every rotation of the options must be answered right).
- Captions: `caption_scores` (BLEU-4 and CIDEr through pycocoevalcap's scorers, which need no Java).
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Iterable, Sequence

# --- short answers -------------------------------------------------------------------------------

_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation to spaces, articles dropped, whitespace collapsed: "The Circle." -> "circle"."""
    words = _PUNCTUATION.sub(" ", text.lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def exact_match(prediction: str, answers: str | Sequence[str]) -> bool:
    """Whether the normalized prediction equals one of the normalized answers."""
    answers = [answers] if isinstance(answers, str) else answers
    return normalize_answer(prediction) in {normalize_answer(a) for a in answers}


# The VQA evaluation's answer normalization (github.com/GT-Vision-Lab/VQA, vqaEval.py, as EvalAI runs it).
_VQA_PUNCTUATION = list(';/[]"{}()=+\\_-><@`,?!')
_VQA_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: "(?!<=" is a typo upstream for "(?<!"; kept for parity
_VQA_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_VQA_NUMBERS = dict(
    none="0",
    zero="0",
    one="1",
    two="2",
    three="3",
    four="4",
    five="5",
    six="6",
    seven="7",
    eight="8",
    nine="9",
    ten="10",
)
# Contractions written with their apostrophes; the official table maps each form that lacks exactly one of them
# (e.g. "dont" -> "don't", "couldnt've" and "couldn'tve" -> "couldn't've").
_VQA_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am mightn't mightn't've
might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've
somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've
something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't
we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's
who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll
you're you've""".split()  # noqa: SIM905
_VQA_CONTRACTIONS = {
    word[:i] + word[i + 1 :]: word for word in _VQA_CONTRACTED for i, c in enumerate(word) if c == "'"
} | {"somebody'd": "somebodyd"}  # sic: the official table maps this one backwards


def vqa_normalize(text: str) -> str:
    """The official VQA answer processing: punctuation, periods, number words, articles, contractions."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _VQA_PUNCTUATION:
        # Punctuation next to a space (or any "1,000"-style number) is deleted, otherwise it splits words.
        if p + " " in text or " " + p in text or _VQA_DIGIT_COMMA.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _VQA_PERIOD.sub("", out)
    words = [_VQA_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_VQA_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy: min(#matching annotators / 3, 1), averaged over the subsets that leave one annotator out.

    With the usual 10 answers: for each annotator, count how many of the *other* 9 gave the prediction.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = vqa_normalize(prediction)
    refs = [vqa_normalize(a) for a in answers]
    matches = sum(r == pred for r in refs)
    # Leaving out annotator i removes one match exactly when annotator i gave the prediction.
    return sum(min(1.0, (matches - (r == pred)) / 3) for r in refs) / len(refs)


# --- yes / no ------------------------------------------------------------------------------------


def parse_yes_no(text: str) -> str | None:
    """ "yes", "no", or None when the answer says neither (MME's rule: the answer, or its first 4 characters)."""
    answer = text.lower().strip().replace(".", "")
    if answer in ("yes", "no"):
        return answer
    if len(answer) == 1:
        return {"y": "yes", "n": "no"}.get(answer)
    head = answer[:4]
    return "yes" if "yes" in head else "no" if "no" in head else None


def parse_pope(text: str) -> str:
    """POPE's own rule (the POPE authors' evaluate.py, as LLaVA's eval_pope runs it): keep the first sentence, drop
    commas; "no" when a word of it is "no", "No" or "not", else "yes". "There is no dog." -> "no"."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "no" if {"no", "No", "not"} & set(words) else "yes"


def binary_scores(predictions: Sequence[str | None], truths: Sequence[str]) -> dict[str, float]:
    """POPE's scores with "yes" as the positive class; a prediction that is neither yes nor no is wrong.

    Returns:
        accuracy, precision, recall, f1, and yes_ratio (the share of predictions that say yes).
    """
    pairs = list(zip(predictions, truths, strict=True))
    tp = sum(p == "yes" and t == "yes" for p, t in pairs)
    fp = sum(p == "yes" and t == "no" for p, t in pairs)
    tn = sum(p == "no" and t == "no" for p, t in pairs)
    fn = sum(p != "yes" and t == "yes" for p, t in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / len(pairs) if pairs else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": sum(p == "yes" for p, _ in pairs) / len(pairs) if pairs else 0.0,
    }


MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_scores(records: Iterable[tuple[str, str, bool]]) -> dict[str, dict[str, float] | float]:
    """MME: per subtask, acc (% of questions right) + acc+ (% of images whose questions are all right).

    Args:
        records: (subtask, image key, correct) per question; MME asks two questions per image.

    Returns:
        {subtask: {"acc", "acc+", "score"}} plus "perception" and "cognition" (sums of the subtasks' scores).
    """
    by_task: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for task, image, correct in records:
        by_task[task][image].append(bool(correct))
    out: dict = {}
    for task, images in sorted(by_task.items()):
        answers = [c for cs in images.values() for c in cs]
        acc = 100 * sum(answers) / len(answers)
        acc_plus = 100 * sum(all(cs) for cs in images.values()) / len(images)
        out[task] = {"acc": acc, "acc+": acc_plus, "score": acc + acc_plus}
    out["perception"] = sum(out[t]["score"] for t in MME_PERCEPTION if t in out)
    out["cognition"] = sum(out[t]["score"] for t in MME_COGNITION if t in out)
    return out


def hallusion_scores(records: Iterable[dict]) -> dict[str, float]:
    """HallusionBench's accuracies from yes/no answers (the benchmark's rule-based variant, no GPT judge).

    Args:
        records: dicts with category ("VD" / "VS"), subcategory, set_id, figure_id, question_id, truth
            ("yes" / "no") and prediction ("yes" / "no" / None). A VS question asked without its figure
            (figure_id 0) also counts as right when the answer commits to neither yes nor no, as upstream scores it.

    Returns:
        all_accuracy (per question), question_pair_accuracy (a question is right on every figure of its set) and
        figure_accuracy (every question about a figure is right; VS questions without a figure are left out).
    """
    pairs: dict[tuple, list[bool]] = defaultdict(list)
    figures: dict[tuple, list[bool]] = defaultdict(list)
    answers = []
    for r in records:
        no_figure = r["category"] == "VS" and str(r["figure_id"]) == "0"
        correct = r["prediction"] == r["truth"] or (no_figure and r["prediction"] is None)
        answers.append(correct)
        group = (r["category"], r["subcategory"], str(r["set_id"]))
        pairs[(*group, str(r["question_id"]))].append(correct)
        if not no_figure:
            figures[(*group, str(r["figure_id"]))].append(correct)

    def share(groups) -> float:
        return sum(all(v) for v in groups.values()) / len(groups) if groups else 0.0

    return {
        "all_accuracy": sum(answers) / len(answers) if answers else 0.0,
        "question_pair_accuracy": share(pairs),
        "figure_accuracy": share(figures),
    }


# --- multiple choice -----------------------------------------------------------------------------

LETTERS = string.ascii_uppercase
_LETTER_FORMS = [
    ("", "."),
    ("", ","),
    ("", ":"),
    ("", ")"),
    ("", ")."),
    ("(", ")"),
    ("(", ")."),
    (":", ""),
    (":", ","),
    (":", "."),
    (":", ")"),
    (":", ")."),
]


def parse_choice(text: str, options: Sequence[str]) -> int | None:
    """The option a generated answer picks (its index), MMBench's way, or None when it can't be told.

    A lone letter ("B"), then a letter in a usual form ("B.", "(B)", ": B"), then the one option whose text the
    answer contains. A bare "A" among more than three words is taken for the article.
    """
    letters = LETTERS[: len(options)]
    words = text.split()
    named = {w for w in words if w in letters}
    if len(named) == 1 and not ("A" in named and len(words) > 3):
        return letters.index(named.pop())
    for prefix, suffix in _LETTER_FORMS:
        named = {c for c in letters if prefix + c + suffix in words}
        if len(named) == 1:
            return letters.index(named.pop())
    lowered = text.lower()
    quoted = [i for i, option in enumerate(options) if str(option).lower() in lowered]
    return quoted[0] if len(quoted) == 1 else None


def circular_options(options: Sequence[str], answer: int) -> list[tuple[list[str], int]]:
    """MMBench's CircularEval: the options rotated by 0 .. n-1 places, each with where the answer moved to."""
    n = len(options)
    return [([options[(i + shift) % n] for i in range(n)], (answer - shift) % n) for shift in range(n)]


# --- captions ------------------------------------------------------------------------------------

_CAPTION_PUNCTUATION = re.compile(r"[^\w\s]")


def caption_tokens(text: str) -> str:
    """Lowercase words without punctuation, space-joined: what COCO's (Java) PTB tokenizer step leaves, except
    that contractions stay whole ("don't" -> "dont"; PTB gives "do n't")."""
    return " ".join(_CAPTION_PUNCTUATION.sub(" ", text.lower()).split())


def caption_scores(predictions: dict[str, str], references: dict[str, Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr (COCO's CIDEr-D: IDF over these references, clipped counts, length penalty).

    Args:
        predictions: item id -> generated caption.
        references: item id -> reference captions (every id of `predictions`).

    Raises:
        ImportError: pycocoevalcap is missing (`pip install -e ".[eval]"`).
    """
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as err:
        raise ImportError('caption metrics need pycocoevalcap: pip install -e ".[eval]"') from err
    if not predictions:
        raise ValueError("caption_scores needs at least one prediction")
    res = {k: [caption_tokens(v)] for k, v in predictions.items()}
    gts = {k: [caption_tokens(r) for r in references[k]] for k in predictions}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}
