"""The tray's logic as a pure state machine: ``step(state, event, now) -> (state, effects)``.

No GUI, no threads, no sockets: every input (hotkey, menu click, control command, what the IO thread heard from
the daemon or the microphone, the passing of time) is an ``Event``; every output (start/stop capture, notify,
copy, record the turn) is an ``Effect`` that the app carries out. The icon's look and the menu's texts are
functions of the state alone (``look``, ``status_line``, ``tooltip``), so everything a person sees is unit-tested.

Turns: each recording gets a new ``turn`` number; the IO thread tags what it reports with it, and reports about a
turn that is no longer current (cancelled, superseded) are ignored here, so a late answer never lands in the
wrong place.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any, Literal

ERROR_HOLD_SECONDS = 6.0
"""How long the error look stays before the icon returns to idle (any new recording clears it at once)."""
PREVIEW_CHARS = 60
Source = Literal["ptt", "toggle", "menu", "control"]


class Phase(enum.Enum):
    IDLE = "idle"
    RECORDING = "recording"
    THINKING = "thinking"
    ERROR = "error"


class Look(enum.Enum):
    """What the icon shows; one picture each (see icons.py)."""

    IDLE = "idle"
    RECORDING = "recording"
    THINKING = "thinking"
    ERROR = "error"
    UNREACHABLE = "unreachable"


# ---- events --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Event:
    pass


@dataclasses.dataclass(frozen=True)
class PttDown(Event):
    """The push-to-talk key combination went down (repeats are filtered before; extra ones are ignored here)."""


@dataclasses.dataclass(frozen=True)
class PttUp(Event):
    pass


@dataclasses.dataclass(frozen=True)
class Toggle(Event):
    """Start recording if not recording, else stop and ask (toggle key, left click, menu, `record --toggle`)."""

    source: Source = "toggle"


@dataclasses.dataclass(frozen=True)
class StartRequested(Event):
    source: Source = "control"


@dataclasses.dataclass(frozen=True)
class StopRequested(Event):
    source: Source = "control"


@dataclasses.dataclass(frozen=True)
class DaemonUp(Event):
    description: str = ""


@dataclasses.dataclass(frozen=True)
class DaemonDown(Event):
    reason: str = "the sottovoce daemon is not running"


@dataclasses.dataclass(frozen=True)
class MicProblem(Event):
    """The microphone cannot be used (none, vanished, stopped delivering); ``message`` says what to do."""

    message: str


@dataclasses.dataclass(frozen=True)
class MicOk(Event):
    name: str = ""
    warning: str | None = None
    """Usable, with a remark (e.g. the chosen microphone is gone and the default is used)."""


@dataclasses.dataclass(frozen=True)
class CaptureStarted(Event):
    """The IO thread has reset the daemon's buffer and is sending this turn's audio."""

    turn: int


@dataclasses.dataclass(frozen=True)
class Hearing(Event):
    """An early transcript of a finished stretch of the recording, while the person is still talking."""

    turn: int
    text: str


@dataclasses.dataclass(frozen=True)
class Heard(Event):
    turn: int
    text: str
    no_speech: bool = False


@dataclasses.dataclass(frozen=True)
class AnswerDelta(Event):
    turn: int
    text: str


@dataclasses.dataclass(frozen=True)
class Answered(Event):
    turn: int
    transcript: str | None
    answer: str
    no_speech: bool = False
    details: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)
    """Timings, audio length, token counts: passed on to the history as they are."""


@dataclasses.dataclass(frozen=True)
class TurnFailed(Event):
    """The turn could not be answered. ``code``: a protocol error code, or one of the tray's own
    (``daemon-lost``, ``daemon-restarted``, ``mic``, ``silent-mic``, ``too-short``)."""

    turn: int
    code: str
    message: str
    details: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)


@dataclasses.dataclass(frozen=True)
class CopyAnswer(Event):
    pass


@dataclasses.dataclass(frozen=True)
class NewConversation(Event):
    """Forget the conversation so far: the next question starts afresh (the daemon remembers a few turns)."""


@dataclasses.dataclass(frozen=True)
class ChooseMicrophone(Event):
    name: str | None
    """A device name, or None for the system default."""


@dataclasses.dataclass(frozen=True)
class Tick(Event):
    """Time passes (the controller sends one about once a second); clears an old error look."""


@dataclasses.dataclass(frozen=True)
class Quit(Event):
    pass


# ---- effects -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Effect:
    pass


@dataclasses.dataclass(frozen=True)
class StartCapture(Effect):
    turn: int


@dataclasses.dataclass(frozen=True)
class StopCapture(Effect):
    """Stop recording this turn and ask with its audio."""

    turn: int


@dataclasses.dataclass(frozen=True)
class CancelTurn(Effect):
    """Stop capturing and drop the answer of this turn (the daemon gets `reset`)."""

    turn: int


@dataclasses.dataclass(frozen=True)
class Notify(Effect):
    title: str
    message: str


@dataclasses.dataclass(frozen=True)
class Copy(Effect):
    text: str


@dataclasses.dataclass(frozen=True)
class ForgetConversation(Effect):
    pass


@dataclasses.dataclass(frozen=True)
class UseMicrophone(Effect):
    name: str | None


@dataclasses.dataclass(frozen=True)
class RecordTurn(Effect):
    """Append the finished (or failed) turn to the history and the log."""

    turn: int
    source: Source
    transcript: str | None
    answer: str | None
    no_speech: bool = False
    error_code: str | None = None
    error: str | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)


@dataclasses.dataclass(frozen=True)
class Exit(Effect):
    pass


# ---- state ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrayState:
    phase: Phase = Phase.IDLE
    connected: bool = False
    daemon: str = ""
    """What the daemon said about itself (models), or why it is unreachable."""
    turn: int = 0
    """The current (or last) recording's number; 0 before the first."""
    source: Source = "ptt"
    """How the current turn was started: push-to-talk ends on key release; the others on the next toggle."""
    hearing: str = ""
    """Early transcripts of the recording in progress."""
    transcript: str | None = None
    answer: str = ""
    """The current turn's answer so far (streamed)."""
    last_answer: str | None = None
    """The last complete answer (the menu item that copies it)."""
    error: str | None = None
    notice: str | None = None
    """A passing remark for the tooltip (e.g. the press was too short); cleared by the next turn."""
    mic_error: str | None = None
    mic_ready: bool = False
    """The microphone delivers audio (it takes PortAudio a second or so to start)."""
    microphone: str | None = None
    since: float = 0.0
    """When the phase was entered (seconds, the controller's monotonic clock)."""
    quitting: bool = False

    # ---- what the person sees ----
    @property
    def look(self) -> Look:
        if self.phase is Phase.RECORDING:
            return Look.RECORDING
        if self.phase is Phase.THINKING:
            return Look.THINKING
        if self.phase is Phase.ERROR or self.mic_error:
            return Look.ERROR
        if not self.connected:
            return Look.UNREACHABLE
        return Look.IDLE

    @property
    def recording(self) -> bool:
        return self.phase is Phase.RECORDING

    def status_line(self, hotkey_hint: str = "") -> str:
        if self.phase is Phase.RECORDING:
            how = "release the key to ask" if self.source == "ptt" else "toggle again to ask"
            return f"Recording… ({how})"
        if self.phase is Phase.THINKING:
            return "Thinking…" if self.transcript is None else "Answering…"
        if self.phase is Phase.ERROR and self.error:
            return f"Error: {self.error}"
        if self.mic_error:
            return f"Microphone: {self.mic_error}"
        if not self.connected:
            return f"Daemon unreachable: {self.daemon or 'not running'}"
        if not self.mic_ready:
            return "Starting the microphone…"
        hint = f" — {hotkey_hint}" if hotkey_hint else ""
        return f"Ready{hint}"

    def tooltip(self, hotkey_hint: str = "") -> str:
        lines = [f"sottovoce: {self.status_line(hotkey_hint)}"]
        if self.connected and self.daemon:
            lines.append(f"daemon: {self.daemon}")
        if self.phase is Phase.RECORDING and self.hearing:
            lines.append(f"» {preview(self.hearing, 120)}…")
        if self.notice and self.phase is not Phase.RECORDING:
            lines.append(self.notice)
        if self.transcript is not None and self.phase is not Phase.RECORDING:
            lines.append(f"» {preview(self.transcript, 120)}")
        shown = self.answer if self.phase is Phase.THINKING else (self.last_answer or "")
        if shown and self.phase is not Phase.RECORDING:
            lines.append(preview(shown, 240))
        return "\n".join(lines)

    @property
    def answer_item(self) -> str:
        """The menu item that shows the (streaming) answer; clicking it copies the last complete one."""
        if self.phase is Phase.THINKING and self.answer:
            return f"Answer: {preview(self.answer, PREVIEW_CHARS)}"
        if self.last_answer:
            return f"Last answer (copy): {preview(self.last_answer, PREVIEW_CHARS)}"
        return "No answer yet"


def preview(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


# ---- the machine ---------------------------------------------------------------------------------------------


def step(state: TrayState, event: Event, now: float) -> tuple[TrayState, list[Effect]]:
    """Apply one event; return the new state and what to do. Pure: no clock, no IO."""
    if state.quitting:
        return state, []
    handler = _HANDLERS.get(type(event))
    if handler is None:
        raise TypeError(f"unknown event {event!r}")
    return handler(state, event, now)


def _start(state: TrayState, source: Source, now: float) -> tuple[TrayState, list[Effect]]:
    if not state.connected:
        return state, [Notify("sottovoce", f"Cannot record: {state.daemon or 'the daemon is not running'}")]
    effects: list[Effect] = []
    if state.phase is Phase.THINKING:
        effects.append(CancelTurn(state.turn))  # a new question supersedes the one being answered
    turn = state.turn + 1
    new = dataclasses.replace(
        state,
        phase=Phase.RECORDING,
        turn=turn,
        source=source,
        hearing="",
        transcript=None,
        answer="",
        error=None,
        notice=None,
        since=now,
    )
    return new, [*effects, StartCapture(turn)]


def _stop(state: TrayState, now: float) -> tuple[TrayState, list[Effect]]:
    new = dataclasses.replace(state, phase=Phase.THINKING, since=now)
    return new, [StopCapture(state.turn)]


def _on_ptt_down(state: TrayState, event: PttDown, now: float) -> tuple[TrayState, list[Effect]]:
    if state.phase is Phase.RECORDING:
        return state, []  # key repeat, or already recording by toggle: never restart a recording
    return _start(state, "ptt", now)


def _on_ptt_up(state: TrayState, event: PttUp, now: float) -> tuple[TrayState, list[Effect]]:
    if state.phase is Phase.RECORDING and state.source == "ptt":
        return _stop(state, now)
    return state, []


def _on_toggle(state: TrayState, event: Toggle, now: float) -> tuple[TrayState, list[Effect]]:
    if state.phase is Phase.RECORDING:
        return _stop(state, now)
    return _start(state, event.source, now)


def _on_start(state: TrayState, event: StartRequested, now: float) -> tuple[TrayState, list[Effect]]:
    if state.phase is Phase.RECORDING:
        return state, []
    return _start(state, event.source, now)


def _on_stop(state: TrayState, event: StopRequested, now: float) -> tuple[TrayState, list[Effect]]:
    if state.phase is Phase.RECORDING:
        return _stop(state, now)
    return state, []


def _on_daemon_up(state: TrayState, event: DaemonUp, now: float) -> tuple[TrayState, list[Effect]]:
    return dataclasses.replace(state, connected=True, daemon=event.description), []


def _on_daemon_down(state: TrayState, event: DaemonDown, now: float) -> tuple[TrayState, list[Effect]]:
    new = dataclasses.replace(state, connected=False, daemon=event.reason)
    if state.phase in (Phase.RECORDING, Phase.THINKING):
        message = f"lost the daemon during the {'recording' if state.recording else 'answer'}: {event.reason}"
        new = dataclasses.replace(new, phase=Phase.ERROR, error=message, since=now)
        return new, [
            CancelTurn(state.turn),
            Notify("sottovoce", message),
            RecordTurn(state.turn, state.source, state.transcript, None, error_code="daemon-lost", error=message),
        ]
    return new, []


def _on_mic_problem(state: TrayState, event: MicProblem, now: float) -> tuple[TrayState, list[Effect]]:
    if state.mic_error == event.message:
        return dataclasses.replace(state, mic_ready=False), []
    new = dataclasses.replace(state, mic_error=event.message, mic_ready=False)
    return new, [Notify("sottovoce: microphone", event.message)]


def _on_mic_ok(state: TrayState, event: MicOk, now: float) -> tuple[TrayState, list[Effect]]:
    new = dataclasses.replace(state, mic_error=None, mic_ready=True)
    return new, [Notify("sottovoce: microphone", event.warning)] if event.warning else []


def _current(state: TrayState, turn: int) -> bool:
    return turn == state.turn and state.phase in (Phase.RECORDING, Phase.THINKING)


def _on_capture_started(state: TrayState, event: CaptureStarted, now: float) -> tuple[TrayState, list[Effect]]:
    return state, []


def _on_hearing(state: TrayState, event: Hearing, now: float) -> tuple[TrayState, list[Effect]]:
    if not _current(state, event.turn) or not event.text.strip():
        return state, []
    return dataclasses.replace(state, hearing=f"{state.hearing} {event.text.strip()}".strip()), []


def _on_heard(state: TrayState, event: Heard, now: float) -> tuple[TrayState, list[Effect]]:
    if not _current(state, event.turn):
        return state, []
    return dataclasses.replace(state, transcript="" if event.no_speech else event.text), []


def _on_answer_delta(state: TrayState, event: AnswerDelta, now: float) -> tuple[TrayState, list[Effect]]:
    if not _current(state, event.turn):
        return state, []
    return dataclasses.replace(state, answer=state.answer + event.text), []


def _on_answered(state: TrayState, event: Answered, now: float) -> tuple[TrayState, list[Effect]]:
    if not _current(state, event.turn):
        return state, []
    record = RecordTurn(
        event.turn,
        state.source,
        event.transcript,
        event.answer,
        no_speech=event.no_speech,
        details=event.details,
    )
    if event.no_speech:
        new = dataclasses.replace(
            state, phase=Phase.IDLE, transcript="", answer="", notice="No speech heard.", since=now
        )
        return new, [record, Notify("sottovoce", "No speech heard.")]
    new = dataclasses.replace(
        state,
        phase=Phase.IDLE,
        transcript=event.transcript,
        answer=event.answer,
        last_answer=event.answer,
        since=now,
    )
    title = f"» {preview(event.transcript, 80)}" if event.transcript else "sottovoce"
    return new, [record, Notify(title, event.answer or "(empty answer)")]


def _on_turn_failed(state: TrayState, event: TurnFailed, now: float) -> tuple[TrayState, list[Effect]]:
    if not _current(state, event.turn):
        return state, []
    record = RecordTurn(
        event.turn,
        state.source,
        state.transcript,
        None,
        error_code=event.code,
        error=event.message,
        details=event.details,
    )
    effects: list[Effect] = [record]
    if state.phase is Phase.RECORDING:
        effects.insert(0, CancelTurn(event.turn))
    if event.code in ("too-short", "not-enough-audio", "no-audio", "cancelled"):
        # An accidental tap is not an error worth a red icon: back to idle, with a word in the tooltip.
        return dataclasses.replace(state, phase=Phase.IDLE, notice=event.message, since=now), effects
    new = dataclasses.replace(state, phase=Phase.ERROR, error=event.message, since=now)
    return new, [*effects, Notify("sottovoce: error", event.message)]


def _on_copy(state: TrayState, event: CopyAnswer, now: float) -> tuple[TrayState, list[Effect]]:
    if not state.last_answer:
        return state, [Notify("sottovoce", "No answer to copy yet.")]
    return state, [Copy(state.last_answer)]


def _on_new_conversation(state: TrayState, event: NewConversation, now: float) -> tuple[TrayState, list[Effect]]:
    return state, [ForgetConversation(), Notify("sottovoce", "New conversation: earlier questions are forgotten.")]


def _on_choose_mic(state: TrayState, event: ChooseMicrophone, now: float) -> tuple[TrayState, list[Effect]]:
    if event.name == state.microphone:
        return state, []
    return dataclasses.replace(state, microphone=event.name, mic_error=None), [UseMicrophone(event.name)]


def _on_tick(state: TrayState, event: Tick, now: float) -> tuple[TrayState, list[Effect]]:
    if state.phase is Phase.ERROR and now - state.since >= ERROR_HOLD_SECONDS:
        return dataclasses.replace(state, phase=Phase.IDLE, since=now), []
    return state, []


def _on_quit(state: TrayState, event: Quit, now: float) -> tuple[TrayState, list[Effect]]:
    effects: list[Effect] = []
    if state.phase in (Phase.RECORDING, Phase.THINKING):
        effects.append(CancelTurn(state.turn))
    return dataclasses.replace(state, quitting=True), [*effects, Exit()]


_Handler = Callable[[TrayState, Any, float], tuple[TrayState, list[Effect]]]
_HANDLERS: dict[type[Event], _Handler] = {
    PttDown: _on_ptt_down,
    PttUp: _on_ptt_up,
    Toggle: _on_toggle,
    StartRequested: _on_start,
    StopRequested: _on_stop,
    DaemonUp: _on_daemon_up,
    DaemonDown: _on_daemon_down,
    MicProblem: _on_mic_problem,
    MicOk: _on_mic_ok,
    CaptureStarted: _on_capture_started,
    Hearing: _on_hearing,
    Heard: _on_heard,
    AnswerDelta: _on_answer_delta,
    Answered: _on_answered,
    TurnFailed: _on_turn_failed,
    CopyAnswer: _on_copy,
    NewConversation: _on_new_conversation,
    ChooseMicrophone: _on_choose_mic,
    Tick: _on_tick,
    Quit: _on_quit,
}
