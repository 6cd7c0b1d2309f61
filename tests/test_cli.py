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


def test_path_prints_the_checkpoint_folder_of_a_model(tmp_path, capsys, monkeypatch):
    assert main(["path", str(CHECKPOINT)]) == 0
    assert capsys.readouterr().out.strip() == str(CHECKPOINT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["path", "nobody/no-such-model"]) != 0
    assert "nobody/no-such-model" in capsys.readouterr().err


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


# --- start-up, bad numbers, media checked first, answer caches (issue 22: 15, 16, 19) ---------------------------


def _run(*args: str, env: dict | None = None):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})  # fmt: skip


def test_help_is_quiet_and_imports_no_torch():
    import time

    start = time.monotonic()
    done = _run("-m", "openowl", "--help")
    elapsed = time.monotonic() - start
    assert done.returncode == 0 and "generate" in done.stdout
    assert done.stderr == ""
    assert elapsed < 5  # it took 5-13 s, importing torch, transformers and torchao
    probe = "import sys, openowl.cli as c\ntry: c.main(['--help'])\nexcept SystemExit: pass\n"
    probe += "print('torch' in sys.modules)"
    assert _run("-c", probe).stdout.strip().endswith("False")


@pytest.mark.parametrize("command", ["generate", "chat", "eval"])
def test_a_command_help_imports_no_torch(command):
    probe = f"import sys, openowl.cli as c\ntry: c.main([{command!r}, '--help'])\nexcept SystemExit: pass\n"
    probe += "print('torch' in sys.modules)"
    done = _run("-c", probe)
    assert done.stdout.strip().endswith("False") and done.stderr == ""


def test_the_flag_names_are_their_owners_names():
    from openowl.cli import DTYPE_NAMES, PRESET_NAMES
    from openowl.constants import DTYPES
    from openowl.infer.sampling import PRESETS

    assert sorted(DTYPE_NAMES) == sorted(DTYPES) and sorted(PRESET_NAMES) == sorted(PRESETS)


def test_a_command_that_loads_the_model_prints_no_import_warnings():
    done = _run("-m", "openowl", "generate", "--model", str(CHECKPOINT), "--prompt", "Hi", "--max-new-tokens", "1")
    assert done.returncode == 0, done.stderr
    for noise in ("Failed to load", "_pytree", "Enum subclass", "torchao"):
        assert noise not in done.stderr


def test_device_auto_is_the_default_and_a_missing_gpu_is_one_line(capsys, monkeypatch):
    import torch

    from openowl.cli import build_parser
    from openowl.infer.prepare import resolve_device, resolve_dtype

    args = build_parser(["generate"]).parse_args(["generate", "--prompt", "Hi"])
    assert args.device == "auto" and args.dtype == "auto"
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr("openowl.loading.load_pretrained", lambda *a, **k: pytest.fail("must not load"))
    assert main(["generate", *MODEL, "--device", "cuda", "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA" in err and "--device cpu" in err
    assert main(["generate", *MODEL, "--device", "gpu7", "--prompt", "Hi"]) == 2
    assert "unknown device 'gpu7'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["eval", "easy-vqa", "--limit", "-5"], ["eval", "easy-vqa", "--limit", "0"], ["eval", "easy-vqa",
     "--batch-size", "0"], ["generate", "--input", "q.jsonl", "--output", "a.jsonl", "--batch-size", "0"]],
)  # fmt: skip
def test_bad_numbers_are_refused_at_once(argv, monkeypatch, capsys):
    monkeypatch.setattr("openowl.cli._engine", lambda args: pytest.fail("the model must not load"))
    monkeypatch.setattr("openowl.eval.tasks.load_easy_vqa", lambda data: pytest.fail("the data must not load"))
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *MODEL])
    assert exit_info.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_generate_jsonl_checks_every_image_and_id_before_the_model_loads(tmp_path, monkeypatch, capsys):
    source, rows = _questions(tmp_path)
    monkeypatch.setattr("openowl.cli._engine", lambda args: pytest.fail("the model must not load"))
    args = ["generate", *MODEL, "--input", str(source), "--output", str(tmp_path / "a.jsonl")]
    bad = [*rows, {"id": "q-late", "question": "And this?", "image": "pics/gone.jpg"}]
    source.write_text("".join(json.dumps(r) + "\n" for r in bad))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "gone.jpg" in err and "q-late" in err
    source.write_text("".join(json.dumps(r) + "\n" for r in [*rows, rows[0]]))
    assert main(args) == 2
    assert "'q-text' occurs twice" in capsys.readouterr().err
    assert not (tmp_path / "a.jsonl").exists()


def test_generate_jsonl_refuses_answers_made_with_other_settings(engine, tmp_path, monkeypatch, capsys):
    source, _ = _questions(tmp_path)
    target = tmp_path / "a.jsonl"
    args = ["generate", *MODEL, "--input", str(source), "--output", str(target), "--max-new-tokens", str(TOKENS)]
    assert main(args) == 0
    settings = json.loads((tmp_path / "a.jsonl.settings.json").read_text())
    assert settings["dtype"] == "float32" and settings["quantize"] is None and settings["model_files"]
    monkeypatch.setattr("openowl.cli._engine", lambda args: pytest.fail("the model must not load"))
    for flags, changed in ((["--dtype", "bfloat16"], "dtype"), (["--quantize", "int4"], "quantize"),
                           (["--max-new-tokens", "3"], "sampling")):  # fmt: skip
        assert main([*args, *flags]) == 2
        err = capsys.readouterr().err
        assert "other settings" in err and changed in err, err
    (tmp_path / "pics" / "image0.jpg").write_bytes((IMAGES / "image1.jpg").read_bytes())  # another picture
    assert main(args) == 2
    assert "data" in capsys.readouterr().err


# --- the chat: Ctrl-C, /video, line editing (issue 22: 18) -----------------------------------------------------


def _stopping_generate(monkeypatch, after: int, how: str):
    """`generate_tokens` that, after `after` tokens of the first answer, raises KeyboardInterrupt from inside the
    stream (`how="raise"`) or sends this process a real SIGINT, as Ctrl-C at a terminal does (`how="signal"`)."""
    import signal

    import openowl.infer.session as session_module

    real = session_module.generate_tokens
    calls = []

    def generate(*args, **kwargs):
        calls.append(1)
        for k, token in enumerate(real(*args, **kwargs)):
            if len(calls) == 1 and k == after:
                if how == "raise":
                    raise KeyboardInterrupt
                signal.raise_signal(signal.SIGINT)
            yield token

    monkeypatch.setattr(session_module, "generate_tokens", generate)


@pytest.mark.parametrize("how", ["raise", "signal"])
def test_chat_ctrl_c_stops_only_the_answer(how, engine, monkeypatch, capsys):
    from openowl.chat import STOPPED, run_chat

    params = SamplingParams(max_new_tokens=TOKENS)
    shown = 2 if how == "raise" else 3  # a SIGINT is read after the token that was being made
    # What the model says when the first answer is cut after `shown` tokens by the reader, not by Ctrl-C.
    reference = ChatSession(engine, params=params)
    cut = reference.ask("Hello")
    first = "".join(next(cut) for _ in range(shown))
    cut.close()
    second = "".join(reference.ask("Again"))

    _stopping_generate(monkeypatch, after=2, how=how)
    session = ChatSession(engine, params=params)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nAgain\n"))
    try:
        assert run_chat(session, [], title="test") == 0
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C during the answer ended the chat")
    answers = [line for line in capsys.readouterr().out.splitlines() if line.startswith("AI: ")]
    assert len(answers) == 2 and answers[0].endswith(STOPPED)
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.ids == reference.ids and session.messages[1:] == reference.messages[1:]
    assert answers[1] == f"AI: {second}" and answers[0].startswith(f"AI: {first}")


def test_chat_video_on_a_model_without_video_is_refused(engine, monkeypatch, capsys):
    from openowl.chat import run_chat

    monkeypatch.setattr("openowl.video.load_video_frames", lambda path: [Image.open(IMAGES / "image0.jpg")] * 4)
    monkeypatch.setattr("sys.stdin", io.StringIO("/video clip.mp4\nHi\n"))
    assert run_chat(ChatSession(engine, params=SamplingParams(max_new_tokens=2)), [], title="test") == 0
    captured = capsys.readouterr()
    assert "takes no video" in captured.err and "video attached" not in captured.err
    assert captured.out.count("AI: ") == 1  # the next message is answered


def test_chat_at_a_terminal_has_line_editing_and_a_history_file(engine, tmp_path, monkeypatch, capsys):
    pytest.importorskip("readline")
    import sys

    from openowl.chat import run_chat

    history = tmp_path / "history"
    monkeypatch.setenv("OPENOWL_CHAT_HISTORY", str(history))
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    lines = iter(["Hi", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.delitem(sys.modules, "readline", raising=False)
    assert run_chat(ChatSession(engine, params=SamplingParams(max_new_tokens=2)), [], title="test") == 0
    assert "readline" in sys.modules and history.is_file()
