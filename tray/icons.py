"""The tray icon, drawn with Pillow: one picture per ``Look`` (idle, recording, thinking, error, unreachable).

Each look differs in colour *and* shape, so it reads at 16 px and for people who do not tell red from green:
a microphone on a blue disc (idle), a microphone on a red disc with a ring (recording), three dots on an amber disc
(thinking), an exclamation mark on an orange-red disc (error), a struck-through microphone on a grey ring (the
daemon is unreachable). Drawn 4x larger and scaled down, for smooth edges.
"""

from __future__ import annotations

import functools

from PIL import Image, ImageDraw

from .state import Look

SIZE = 64
_SCALE = 4

COLOURS: dict[Look, tuple[int, int, int]] = {
    Look.IDLE: (52, 101, 164),
    Look.RECORDING: (211, 36, 36),
    Look.THINKING: (232, 160, 20),
    Look.ERROR: (222, 78, 16),
    Look.UNREACHABLE: (128, 128, 128),
}
WHITE = (255, 255, 255, 255)


@functools.cache
def icon(look: Look, size: int = SIZE) -> Image.Image:
    """The RGBA picture for ``look`` (cached; treat it as read-only)."""
    big = size * _SCALE
    image = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    s = big / 64.0  # drawing units: a 64 x 64 grid
    colour = (*COLOURS[look], 255)

    if look is Look.UNREACHABLE:
        draw.ellipse(_box(3, 3, 61, 61, s), outline=colour, width=round(6 * s))
        _microphone(draw, s, colour)
        draw.line([(14 * s, 50 * s), (50 * s, 14 * s)], fill=colour, width=round(6 * s))
    else:
        draw.ellipse(_box(2, 2, 62, 62, s), fill=colour)
        if look is Look.IDLE:
            _microphone(draw, s, WHITE)
        elif look is Look.RECORDING:
            draw.ellipse(_box(7, 7, 57, 57, s), outline=WHITE, width=round(3 * s))
            _microphone(draw, s, WHITE)
        elif look is Look.THINKING:
            for cx in (18, 32, 46):
                draw.ellipse(_box(cx - 5, 27, cx + 5, 37, s), fill=WHITE)
        elif look is Look.ERROR:
            draw.rounded_rectangle(_box(28, 12, 36, 40, s), radius=4 * s, fill=WHITE)
            draw.ellipse(_box(27.5, 44, 36.5, 53, s), fill=WHITE)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def _microphone(draw: ImageDraw.ImageDraw, s: float, fill: tuple[int, int, int, int]) -> None:
    draw.rounded_rectangle(_box(25, 12, 39, 36, s), radius=7 * s, fill=fill)  # capsule
    draw.arc(_box(19, 20, 45, 44, s), start=0, end=180, fill=fill, width=round(3.5 * s))  # cradle
    draw.line([(32 * s, 44 * s), (32 * s, 51 * s)], fill=fill, width=round(3.5 * s))  # stem
    draw.line([(24 * s, 52 * s), (40 * s, 52 * s)], fill=fill, width=round(3.5 * s))  # base


def _box(x0: float, y0: float, x1: float, y1: float, s: float) -> tuple[float, float, float, float]:
    return (x0 * s, y0 * s, x1 * s, y1 * s)


def sheet(size: int = SIZE) -> Image.Image:
    """All looks side by side on a light and a dark strip (for the docs)."""
    looks = list(Look)
    pad = size // 4
    out = Image.new("RGBA", (len(looks) * (size + pad) + pad, 2 * (size + pad) + pad), (0, 0, 0, 0))
    for row, bg in enumerate(((245, 245, 245, 255), (40, 40, 40, 255))):
        y = pad + row * (size + pad)
        ImageDraw.Draw(out).rectangle((0, y - pad // 2, out.width, y + size + pad // 2), fill=bg)
        for n, look in enumerate(looks):
            out.alpha_composite(icon(look, size), (pad + n * (size + pad), y))
    return out
