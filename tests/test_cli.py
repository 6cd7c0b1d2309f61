"""The `openowl` command end to end on the parity checkpoint: one answer, a resumable jsonl batch, a scripted
chat, and the errors a user can make (exit code 2, a message on stderr that names the problem)."""

from __future__ import annotations

import io
import json
import re
import shutil

import pytest
from conftest import CHECKPOINT, IMAGES
from PIL import Image

from openowl.cli import main
from openowl.infer.engine import Engine, Request
from openowl.infer.sampling import SamplingParams
from openowl.infer.session import ChatSession

MODEL = ["--model", str(CHECKPOINT)]
TOKENS = 8


@pytest.fixture(scope="module")
def engine(model, processor) -> Engine:
    return Engine(model, processor)


def _greedy(engine: Engine, question: str, images=()) -> str:
    parts = [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]
    prompt = engine.processor.apply_chat_template([{"role": "user", "content": parts}])
    return engine.generate([Request(prompt, list(images))], SamplingParams(max_new_tokens=TOKENS))[0].text


def test_generate_prompt_prints_the_greedy_answer(engine, capsys):
    image = IMAGES / "image0.jpg"
    code = main(["generate", *MODEL, "--image", str(image), "--prompt", "What is in this image?",
                 "--max-new-tokens", str(TOKENS)])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert out == _greedy(engine, "What is in this image?", [image]) + "\n"
    assert len(out.strip()) > 0


def test_generate_prompt_stop_and_sampling_flags(engine, capsys):
    full = _greedy(engine, "Hi")
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert main(["generate", *MODEL, "--prompt", "Hi", "--max-new-tokens", str(TOKENS), f"--stop={stop}"]) == 0
    assert capsys.readouterr().out == full[: full.index(stop)] + "\n"
    sampled = ["generate", *MODEL, "--prompt", "Hi", "--max-new-tokens", "6", "--do-sample", "--seed", "3"]
    assert main(sampled) == 0
    first = capsys.readouterr().out
    assert main(sampled) == 0
    assert capsys.readouterr().out == first


def _questions(folder):
    """Three questions with 0, 1 and 2 images, image paths relative to the jsonl file."""
    (folder / "pics").mkdir()
    for name in ("image0.jpg", "image1.jpg"):
        shutil.copy(IMAGES / name, folder / "pics" / name)
    rows = [
        {"id": "q-text", "question": "Name a bird."},
        {"id": "q-one", "question": "What is this?", "image": "pics/image0.jpg"},
        {"id": "q-two", "prompt": "Compare them.", "images": ["pics/image0.jpg", "pics/image1.jpg"]},
    ]
    source = folder / "q.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")  # a blank line is fine
    return source, rows


def _count_requests(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = Engine.generate

    def counting(self, requests, params):
        calls.append(len(requests))
        return original(self, requests, params)

    monkeypatch.setattr(Engine, "generate", counting)
    return calls


def _read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_jsonl_batch_and_resume(engine, tmp_path, monkeypatch):
    source, rows = _questions(tmp_path)
    target = tmp_path / "a.jsonl"
    args = ["generate", *MODEL, "--input", str(source), "--output", str(target), "--max-new-tokens", str(TOKENS),
            "--batch-size", "2"]  # fmt: skip
    calls = _count_requests(monkeypatch)
    assert main(args) == 0
    assert calls == [2, 1]
    answers = _read(target)
    assert [a["id"] for a in answers] == ["q-text", "q-one", "q-two"]
    assert [a["question"] for a in answers] == ["Name a bird.", "What is this?", "Compare them."]
    assert answers[1]["answer"] == _greedy(engine, "What is this?", [IMAGES / "image0.jpg"])
    assert answers[2]["answer"] == _greedy(engine, "Compare them.", [IMAGES / "image0.jpg", IMAGES / "image1.jpg"])
    assert all(a["finish_reason"] in ("stop", "length") for a in answers)

    # Everything answered: nothing is recomputed.
    calls.clear()
    assert main(args) == 0
    assert calls == [] and _read(target) == answers

    # One answer removed: only that one is recomputed, the others are kept as they were.
    lines = target.read_text().splitlines(keepends=True)
    target.write_text(lines[0] + lines[2])
    assert main(args) == 0
    assert calls == [1]
    redone = _read(target)
    assert sorted(a["id"] for a in redone) == ["q-one", "q-text", "q-two"]
    assert {a["id"]: a for a in redone} == {a["id"]: a for a in answers}


def test_generate_jsonl_drops_a_cut_last_line(engine, tmp_path, monkeypatch):
    source, _ = _questions(tmp_path)
    target = tmp_path / "a.jsonl"
    args = ["generate", *MODEL, "--input", str(source), "--output", str(target), "--max-new-tokens", str(TOKENS)]
    assert main(args) == 0
    answers = _read(target)
    lines = target.read_text().splitlines(keepends=True)
    target.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])  # the run was killed mid-write
    calls = _count_requests(monkeypatch)
    assert main(args) == 0
    assert calls == [1]
    assert _read(target) == answers  # every line is valid JSON again, in the original order

    # Killed right before the newline: the last answer is kept and the next one starts on its own line.
    target.write_text(lines[0] + lines[1].rstrip("\n"))
    calls.clear()
    assert main(args) == 0
    assert calls == [1]
    assert _read(target) == answers


def test_generate_jsonl_bad_line_names_it(tmp_path, capsys):
    source = tmp_path / "q.jsonl"
    source.write_text('{"question": "ok"}\n{"question": \n')
    code = main(["generate", *MODEL, "--input", str(source), "--output", str(tmp_path / "a.jsonl")])
    assert code == 2
    assert "q.jsonl:2" in capsys.readouterr().err


def test_chat_scripted(engine, monkeypatch, capsys):
    image = IMAGES / "image1.jpg"
    script = f"Hello\n/image {image}\nWhat?\n/image /no/such/picture.jpg\n/reset\n/quit\nNever asked\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert main(["chat", *MODEL, "--max-new-tokens", str(TOKENS)]) == 0
    captured = capsys.readouterr()
    answers = [line for line in captured.out.splitlines() if line.startswith("AI: ")]
    assert len(answers) == 2

    session = ChatSession(engine, params=SamplingParams(max_new_tokens=TOKENS))
    first = "".join(session.ask("Hello"))
    second = "".join(session.ask("What?", images=[Image.open(image)]))
    assert answers == [f"AI: {first}", f"AI: {second}"]
    assert "image attached" in captured.err
    assert "picture.jpg" in captured.err  # the bad /image is reported and the chat goes on
    assert "conversation cleared" in captured.err


def test_chat_eof_ends_the_session(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    assert main(["chat", *MODEL, "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.count("AI: ") == 1


def test_missing_image_file(tmp_path, capsys):
    missing = tmp_path / "nowhere.jpg"
    assert main(["generate", *MODEL, "--image", str(missing), "--prompt", "What?"]) == 2
    err = capsys.readouterr().err
    assert "nowhere.jpg" in err and "no such" in err


def test_unreadable_image_file(tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes((IMAGES / "image0.jpg").read_bytes()[:200])
    assert main(["generate", *MODEL, "--image", str(broken), "--prompt", "What?"]) == 2
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "not a readable image" in err


def test_missing_image_in_jsonl(tmp_path, capsys):
    source = tmp_path / "q.jsonl"
    source.write_text(json.dumps({"question": "What?", "image": "gone.jpg"}) + "\n")
    code = main(["generate", *MODEL, "--input", str(source), "--output", str(tmp_path / "a.jsonl")])
    assert code == 2
    assert "gone.jpg" in capsys.readouterr().err


def test_model_folder_without_config(tmp_path, capsys):
    folder = tmp_path / "not-a-model"
    shutil.copytree(CHECKPOINT, folder)
    (folder / "config.json").unlink()
    assert main(["generate", "--model", str(folder), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert str(folder) in err and "config.json" in err


def test_argument_errors(tmp_path, capsys, monkeypatch):
    def no_loading(args):
        raise AssertionError("the model must not load for a command line that is wrong")

    monkeypatch.setattr("openowl.cli._engine", no_loading)
    assert main(["generate", *MODEL]) == 2
    assert "--prompt" in capsys.readouterr().err
    assert main(["generate", *MODEL, "--input", str(tmp_path / "q.jsonl")]) == 2
    assert "--output" in capsys.readouterr().err
    assert main(["generate", *MODEL, "--input", str(tmp_path / "q.jsonl"), "--output", "a.jsonl"]) == 2
    assert "q.jsonl" in capsys.readouterr().err
    assert main(["generate", *MODEL, "--prompt", "Hi", "--max-new-tokens", "0"]) == 2
    assert "max_new_tokens" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    assert main(["chat", *MODEL, "--do-sample", "--temperature", "0"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(["chat", *MODEL, "--image", str(tmp_path / "absent.png")]) == 2
    assert "absent.png" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", *MODEL, "--prompt", "Hi", "--dtype", "int3"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    "command, flags",
    [
        ("generate", ["--model", "--dtype", "--device", "--quantize", "--image", "--video", "--prompt", "--input",
                      "--output", "--batch-size", "--preset", "--max-new-tokens", "--do-sample", "--temperature",
                      "--top-k", "--top-p", "--repetition-penalty", "--no-repeat-ngram-size", "--stop", "--seed"]),
        ("chat", ["--model", "--dtype", "--device", "--quantize", "--image", "--preset", "--max-new-tokens",
                  "--do-sample", "--temperature", "--top-k", "--top-p", "--repetition-penalty",
                  "--no-repeat-ngram-size", "--stop", "--seed", "/image", "/video", "/reset", "/quit"]),
    ],
)  # fmt: skip
def test_help_lists_the_flags(command, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in flags:
        assert flag in out, flag
    assert not [flag for flag in re.findall(r"--[\w-]+", out) if "_" in flag]  # kebab-case only
