"""The tray's state machine: events in, state and effects out (no GUI, no threads)."""

from __future__ import annotations

import dataclasses

import pytest

from sottovoce.tray import state as s
from sottovoce.tray.state import Look, Phase, TrayState, step

READY = TrayState(connected=True, daemon="fake-whisper + fake-llm", mic_ready=True)


def run(state: TrayState, *events: s.Event, now: float = 0.0) -> tuple[TrayState, list[s.Effect]]:
    effects: list[s.Effect] = []
    for event in events:
        state, more = step(state, event, now)
        effects += more
    return state, effects


def test_push_to_talk_turn() -> None:
    st, fx = run(READY, s.PttDown())
    assert st.phase is Phase.RECORDING and st.look is Look.RECORDING and st.turn == 1
    assert fx == [s.StartCapture(1)]
    st, fx = run(st, s.PttUp())
    assert st.phase is Phase.THINKING and st.look is Look.THINKING
    assert fx == [s.StopCapture(1)]
    st, fx = run(st, s.Heard(1, "what time is it"), s.AnswerDelta(1, "It is"), s.AnswerDelta(1, " noon."))
    assert st.transcript == "what time is it" and st.answer == "It is noon." and fx == []
    assert "It is noon." in st.tooltip() and st.answer_item.startswith("Answer: It is noon.")
    st, fx = run(st, s.Answered(1, "what time is it", "It is noon."))
    assert st.phase is Phase.IDLE and st.look is Look.IDLE and st.last_answer == "It is noon."
    assert fx[0] == s.RecordTurn(1, "ptt", "what time is it", "It is noon.")
    assert isinstance(fx[1], s.Notify) and fx[1].message == "It is noon."
    assert st.answer_item.startswith("Last answer (copy): It is noon.")


def test_auto_repeat_never_restarts_a_recording() -> None:
    st, fx = run(READY, s.PttDown(), s.PttDown(), s.PttDown(), s.PttDown())
    assert st.turn == 1 and fx == [s.StartCapture(1)]
    st, fx = run(st, s.PttUp(), s.PttUp())
    assert fx == [s.StopCapture(1)]


def test_toggle_turn_ignores_push_to_talk_release() -> None:
    st, fx = run(READY, s.Toggle("toggle"))
    assert st.recording and st.source == "toggle" and fx == [s.StartCapture(1)]
    st, fx = run(st, s.PttDown(), s.PttUp())  # a stray push-to-talk neither restarts nor stops it
    assert st.recording and fx == []
    st, fx = run(st, s.Toggle("menu"))
    assert st.phase is Phase.THINKING and fx == [s.StopCapture(1)]


def test_start_and_stop_requests_are_idempotent() -> None:
    st, fx = run(READY, s.StartRequested(), s.StartRequested())
    assert fx == [s.StartCapture(1)]
    st, fx = run(st, s.StopRequested(), s.StopRequested())
    assert fx == [s.StopCapture(1)]


def test_new_recording_while_thinking_cancels_the_old_answer() -> None:
    st, _ = run(READY, s.PttDown(), s.PttUp())
    st, fx = run(st, s.PttDown())
    assert fx == [s.CancelTurn(1), s.StartCapture(2)] and st.turn == 2 and st.recording
    # the old turn's late replies land nowhere
    st2, fx = run(st, s.AnswerDelta(1, "stale"), s.Answered(1, "old", "stale"), s.TurnFailed(1, "cancelled", "x"))
    assert st2 == st and fx == []


def test_cannot_record_without_daemon() -> None:
    st, fx = run(TrayState(connected=False, daemon="not running"), s.PttDown())
    assert st.phase is Phase.IDLE and st.look is Look.UNREACHABLE
    assert len(fx) == 1 and isinstance(fx[0], s.Notify) and "not running" in fx[0].message
    assert "Daemon unreachable" in st.status_line()


def test_daemon_lost_mid_recording_gives_error_then_recovers() -> None:
    st, _ = run(READY, s.PttDown())
    st, fx = run(st, s.DaemonDown("connection lost"), now=10.0)
    assert st.phase is Phase.ERROR and st.look is Look.ERROR and not st.connected
    assert s.CancelTurn(1) in fx
    assert any(isinstance(e, s.RecordTurn) and e.error_code == "daemon-lost" for e in fx)
    # the IO thread's own report of the failure is not recorded twice
    st, fx = run(st, s.TurnFailed(1, "daemon-lost", "lost"))
    assert fx == []
    st, _ = run(st, s.DaemonUp("back"), now=11.0)
    assert st.connected and st.look is Look.ERROR  # the error stays visible for a while...
    st, _ = run(st, s.Tick(), now=10.0 + s.ERROR_HOLD_SECONDS + 0.1)
    assert st.phase is Phase.IDLE and st.look is Look.IDLE  # ...then the icon is back to normal
    st, fx = run(st, s.PttDown())
    assert fx == [s.StartCapture(2)]


def test_error_clears_at_once_on_a_new_recording() -> None:
    st, _ = run(READY, s.PttDown(), s.PttUp(), s.TurnFailed(1, "model-error", "whisper failed"))
    assert st.phase is Phase.ERROR and st.error == "whisper failed"
    assert st.status_line() == "Error: whisper failed"
    st, fx = run(st, s.PttDown())
    assert st.recording and st.error is None and fx == [s.StartCapture(2)]


@pytest.mark.parametrize("code", ["too-short", "not-enough-audio", "no-audio"])
def test_a_tap_is_not_an_error(code: str) -> None:
    st, fx = run(READY, s.PttDown(), s.PttUp(), s.TurnFailed(1, code, "too short to ask"))
    assert st.phase is Phase.IDLE and st.look is Look.IDLE and st.notice == "too short to ask"
    assert [type(e) for e in fx] == [s.StartCapture, s.StopCapture, s.RecordTurn]


def test_failure_while_recording_stops_the_capture() -> None:
    st, fx = run(READY, s.PttDown(), s.TurnFailed(1, "silent-mic", "only zeros"))
    assert st.phase is Phase.ERROR
    assert fx[1] == s.CancelTurn(1)
    assert any(isinstance(e, s.RecordTurn) and e.error_code == "silent-mic" for e in fx)


def test_no_speech() -> None:
    st, fx = run(READY, s.PttDown(), s.PttUp(), s.Heard(1, "", True), s.Answered(1, None, "", no_speech=True))
    assert st.phase is Phase.IDLE and st.notice == "No speech heard." and st.last_answer is None
    assert any(isinstance(e, s.RecordTurn) and e.no_speech for e in fx)


def test_microphone_problem_and_recovery() -> None:
    st, fx = run(READY, s.MicProblem("no microphone found"))
    assert st.look is Look.ERROR and st.status_line() == "Microphone: no microphone found"
    assert fx == [s.Notify("sottovoce: microphone", "no microphone found")]
    st, fx = run(st, s.MicProblem("no microphone found"))  # said once, not on every retry
    assert fx == []
    assert not st.mic_ready
    st, fx = run(st, s.MicOk("pulse"))
    assert st.look is Look.IDLE and st.mic_ready and fx == []
    st, fx = run(st, s.MicOk("default", warning="microphone 'USB' not found; using the system default"))
    assert st.look is Look.IDLE
    assert fx == [s.Notify("sottovoce: microphone", "microphone 'USB' not found; using the system default")]


def test_ready_only_once_the_microphone_delivers() -> None:
    st = TrayState(connected=True)
    assert st.look is Look.IDLE and st.status_line() == "Starting the microphone…"
    st, _ = run(st, s.MicOk("pulse"))
    assert st.status_line("hold Ctrl+Alt+Space to talk") == "Ready — hold Ctrl+Alt+Space to talk"


def test_copy_answer() -> None:
    st, fx = run(READY, s.CopyAnswer())
    assert isinstance(fx[0], s.Notify)
    st = dataclasses.replace(READY, last_answer="Paris.")
    assert run(st, s.CopyAnswer())[1] == [s.Copy("Paris.")]


def test_choose_microphone() -> None:
    st, fx = run(READY, s.ChooseMicrophone("USB Mic"))
    assert st.microphone == "USB Mic" and fx == [s.UseMicrophone("USB Mic")]
    assert run(st, s.ChooseMicrophone("USB Mic"))[1] == []
    assert run(st, s.ChooseMicrophone(None))[1] == [s.UseMicrophone(None)]


def test_early_transcripts_show_while_recording() -> None:
    st, _ = run(READY, s.PttDown(), s.Hearing(1, " What is"), s.Hearing(1, "the capital "))
    assert st.hearing == "What is the capital"
    assert "» What is the capital…" in st.tooltip()
    st, _ = run(st, s.PttUp(), s.PttDown())  # a new turn starts empty
    assert st.hearing == ""


def test_new_conversation() -> None:
    _, fx = run(READY, s.NewConversation())
    assert fx[0] == s.ForgetConversation()


def test_quit_cancels_and_exits_and_ignores_the_rest() -> None:
    st, fx = run(READY, s.PttDown(), s.Quit())
    assert fx[-2:] == [s.CancelTurn(1), s.Exit()] and st.quitting
    assert run(st, s.PttUp(), s.Quit())[1] == []


def test_every_event_type_has_a_handler() -> None:
    events = [cls for cls in vars(s).values() if isinstance(cls, type) and issubclass(cls, s.Event)]
    assert set(events) - {s.Event} <= set(s._HANDLERS)
    with pytest.raises(TypeError):
        step(READY, s.Event(), 0.0)


def test_looks_are_distinct_per_state() -> None:
    looks = {
        run(TrayState(), s.Tick())[0].look,
        READY.look,
        run(READY, s.PttDown())[0].look,
        run(READY, s.PttDown(), s.PttUp())[0].look,
        run(READY, s.PttDown(), s.PttUp(), s.TurnFailed(1, "model-error", "x"))[0].look,
    }
    assert looks == set(Look)


def test_preview() -> None:
    assert s.preview("a  b\nc", 10) == "a b c"
    long = s.preview("word " * 50, 20)
    assert len(long) == 20 and long.endswith("…")
