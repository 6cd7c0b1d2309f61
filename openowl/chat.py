"""The terminal chat (`openowl chat`): lines from the keyboard or a pipe, slash commands for media, answers
streamed as they are made, over one `ChatSession`."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TextIO

from openowl.infer.session import ChatSession
from openowl.processing import load_image
from openowl.video import load_video_frames

CHAT_HELP = """commands:
  /image PATH   attach an image to your next message (repeat for several)
  /video PATH   attach a video file to your next message
  /reset        forget the conversation
  /quit         leave (or Ctrl-D)"""


class TerminalChat:
    """A chat session plus the media attached for the next message."""

    def __init__(self, session: ChatSession, images: list | None = None, out: TextIO | None = None):
        self.session = session
        self.images = list(images or [])
        self.videos: list = []
        self.out = out or sys.stdout

    def command(self, line: str) -> bool:
        """Run a slash command; False for /quit."""
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
            self.videos.append(load_video_frames(argument))
            print(f"(video attached: {argument})", file=sys.stderr)
        else:
            print(f"unknown command {command}\n{CHAT_HELP}", file=sys.stderr)
        return True

    def ask(self, line: str) -> None:
        """Stream the answer to one message, with the media attached since the last one."""
        print("AI: ", end="", flush=True, file=self.out)
        for delta in self.session.ask(line, images=self.images, videos=self.videos):
            print(delta, end="", flush=True, file=self.out)
        print(file=self.out)
        self.images, self.videos = [], []


def run_chat(session: ChatSession, images: list, title: str) -> int:
    """Chat until /quit or the end of the input."""
    chat = TerminalChat(session, images)
    print(f"openowl chat — {title}\n{CHAT_HELP}", file=sys.stderr)
    for line in input_lines(sys.stdin.isatty()):
        line = line.strip()
        if not line:
            continue
        if not line.startswith("/"):
            chat.ask(line)
            continue
        try:
            if not chat.command(line):
                break
        except (FileNotFoundError, ValueError, ImportError) as err:
            print(f"error: {err}", file=sys.stderr)
    return 0


def input_lines(interactive: bool) -> Iterator[str]:
    """Lines typed at a `Human: ` prompt, or read from a pipe, until the end of the input."""
    while True:
        if interactive:
            try:
                yield input("Human: ")
            except EOFError:
                return
        else:
            line = sys.stdin.readline()
            if not line:
                return
            yield line
