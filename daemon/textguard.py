"""Cut Whisper's repetition loops ("thank you. thank you. thank you. ...") out of a transcript.

Whisper's compression-ratio check catches most loops inside a 30 s window, but not a phrase repeated a few times in
a short stretch, nor one that survives at the highest fallback temperature.
"""

from __future__ import annotations

MAX_PHRASE_WORDS = 8
MAX_REPEATS = 3
"""A phrase may occur this many times in a row (people do say "no, no, no"); further repeats are cut."""


def cut_repetitions(text: str, *, max_repeats: int = MAX_REPEATS, max_phrase_words: int = MAX_PHRASE_WORDS) -> str:
    words = text.split()
    if len(words) <= max_repeats:
        return text.strip()
    out: list[str] = []
    i = 0
    while i < len(words):
        cut = False
        for n in range(1, max_phrase_words + 1):
            phrase = _norm(words[i : i + n])
            if len(phrase) < n:
                break
            repeats = 1
            while _norm(words[i + repeats * n : i + (repeats + 1) * n]) == phrase:
                repeats += 1
            if repeats > max_repeats:
                out.extend(words[i : i + max_repeats * n])
                i += repeats * n
                cut = True
                break
        if not cut:
            out.append(words[i])
            i += 1
    return " ".join(out)


def _norm(words: list[str]) -> list[str]:
    return [w.strip(".,!?;:…\"'").lower() for w in words]
