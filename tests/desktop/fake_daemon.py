"""A daemon with fake models, as a separate process: `python fake_daemon.py ENDPOINT`; stops on SIGTERM.

The desktop tests use it where the real small models are not installed, and to kill and restart a daemon in
a fraction of a second. Its Whisper "hears" the audio's length and level (``heard N samples at RMS``); its chat
model echoes the question word by word (``you said: ...``).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: fakes, inproc

from fakes import FakeChat, FakeTranscriber
from inproc import RunningServer

from sottovoce.client.config import Settings


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("endpoint")
    parser.add_argument("--transcribe-delay", type=float, default=0.0)
    parser.add_argument("--token-delay", type=float, default=0.02)
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    settings = Settings(endpoint=args.endpoint)
    transcriber = FakeTranscriber(delay=args.transcribe_delay)
    chat = FakeChat(token_delay=args.token_delay)
    with RunningServer(args.endpoint, settings, transcriber, chat):
        print("fake daemon listening on", args.endpoint, flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
