"""The terminal chat (`openowl chat`): lines from the keyboard or a pipe, slash commands for media, answers
streamed as they are made, over one `ChatSession`.

At a terminal the prompt has line editing and history (readline; the history is also kept in the file named by
OPENOWL_CHAT_HISTORY, when set). Ctrl-C while an answer streams stops that answer only, as in llama.cpp and ollama:
the words so far stay in the conversation and the chat goes on; Ctrl-C at the prompt, /quit or Ctrl-D leave.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:  # the heavy imports wait for the chat itself: `openowl --help` reads CHAT_HELP
    from openowl.infer.session import ChatSession

CHAT_HELP = """commands:
  /image PATH   attach an image to your next message (repeat for several)
  /video PATH   attach a video file to your next message (video checkpoints only)
  /reset        forget the conversation
  /quit         leave (or Ctrl-D)
Ctrl-C while an answer streams stops the answer; the conversation goes on."""

STOPPED = " [stopped]"


class TerminalChat:
    """A chat session plus the media attached for the next message."""

    def __init__(self, session: ChatSession, images: list | None = None, out: TextIO | None = None):
        self.session = session
        self.images = list(images or [])
        self.videos: list = []
        self.out = out or sys.stdout
        self.stop = threading.Event()  # set by Ctrl-C while an answer streams

    def command(self, line: str) -> bool:
        """Run a slash command; False for /quit."""
        from openowl.processing import load_image
        from openowl.video import load_video_frames

        command, _, argument = line.partition(" ")
        argument = argument.strip()
        if command == "/quit":
            return False
        if command == "/reset":
            self.session.reset()
            self.images, self.videos = [], []
            print("(conversation cleared)", file=sys.stderr)
        elif command == "/image":
            self.images.append(load_image(argument))
            print(f"(image attached: {argument})", file=sys.stderr)
        elif command == "/video":
            if not getattr(self.session.engine.model.config, "video", False):
                raise ValueError("this model takes no video (it has no temporal modules): attach frames with /image")
            self.videos.append(load_video_frames(argument))
            print(f"(video attached: {argument})", file=sys.stderr)
        else:
            print(f"unknown command {command}\n{CHAT_HELP}", file=sys.stderr)
        return True

    def ask(self, line: str) -> None:
        """Stream the answer to one message, with the media attached since the last one. Ctrl-C (the `stop` event,
        or a KeyboardInterrupt raised inside the stream) ends the answer; the session keeps the part shown."""
        print("AI: ", end="", flush=True, file=self.out)
        self.stop.clear()
        stream = self.session.ask(line, images=self.images, videos=self.videos)
        try:
            with _StopOnCtrlC(self.stop):
                for delta in stream:
                    print(delta, end="", flush=True, file=self.out)
                    if self.stop.is_set():
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            stream.close()  # the session records the answer so far (its `finally`)
            print(STOPPED, end="", file=self.out)
            _realign_cache(self.session)
        print(file=self.out)
        self.images, self.videos = [], []


class _StopOnCtrlC:
    """While an answer streams at a terminal, SIGINT sets `event` (read between tokens) instead of raising inside
    the model's forward pass; elsewhere (a pipe, another thread) Ctrl-C raises KeyboardInterrupt as usual."""

    def __init__(self, event: threading.Event):
        self.event, self.previous = event, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, lambda *_: self.event.set())

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _realign_cache(session: ChatSession) -> None:
    """After an interrupt that may have cut a forward pass, keep the KV cache only as long as its shortest layer,
    so that every layer agrees; the next turn feeds the session's remaining ids (`ChatSession._generate`)."""
    cache = getattr(session, "_cache", None)
    layers = getattr(cache, "layers", None)
    if not layers or not hasattr(cache, "crop"):
        return
    lengths = [layer.get_seq_length() for layer in layers]
    if min(lengths) != max(lengths):
        cache.crop(min(lengths))


def run_chat(session: ChatSession, images: list, title: str) -> int:
    """Chat until /quit, Ctrl-C at the prompt, or the end of the input."""
    chat = TerminalChat(session, images)
    interactive = sys.stdin.isatty()
    print(f"openowl chat — {title}\n{CHAT_HELP}", file=sys.stderr)
    history = _line_editing() if interactive else None
    try:
        for line in input_lines(interactive):
            line = line.strip()
            if not line:
                continue
            try:
                if not line.startswith("/"):
                    chat.ask(line)
                elif not chat.command(line):
                    break
            except (FileNotFoundError, ValueError, ImportError) as err:
                print(f"error: {err}", file=sys.stderr)
    finally:
        if history:
            _save_history(history)
    return 0


def _line_editing() -> str | None:
    """Line editing and history at the `Human: ` prompt (readline, where Python has it); returns the history file
    to save at the end (OPENOWL_CHAT_HISTORY), if any."""
    try:
        import readline
    except ImportError:  # e.g. Windows without pyreadline: plain input()
        return None
    path = os.environ.get("OPENOWL_CHAT_HISTORY")
    if path and os.path.exists(path):
        with contextlib.suppress(OSError):
            readline.read_history_file(path)
    return path


def _save_history(path: str) -> None:
    import readline

    try:
        readline.set_history_length(1000)
        readline.write_history_file(path)
    except OSError as err:
        print(f"(chat history not saved: {err})", file=sys.stderr)


def input_lines(interactive: bool) -> Iterator[str]:
    """Lines typed at a `Human: ` prompt, or read from a pipe, until the end of the input (or Ctrl-C at the
    prompt)."""
    while True:
        if interactive:
            try:
                yield input("Human: ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return
        else:
            line = sys.stdin.readline()
            if not line:
                return
            yield line
