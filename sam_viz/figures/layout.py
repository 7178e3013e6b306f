"""Layout shared by every figure of the app: a short title and one subtitle line that fit a
half-width column, placed below the band where plotly's modebar appears, with a top margin that
holds them; and percentage ticks that stay distinct whatever the data range.

Sizes: Streamlit's chart theme draws titles at 16 px (bold) and the app's half-width columns are
462 px wide in a 1400 px window with the sidebar open (measured in Chromium). At about 0.55 font
sizes per character (a safe bound for the UI font, bold included) a title line may hold
462 / (0.55 * 16) = 52 characters and a 13 px subtitle line 64: `max_chars(font_px)`.
plotly only; no Streamlit.
"""
from __future__ import annotations

import html
import math
import re

TITLE_PX = 16             # title font size, set on every figure so that no theme changes it
SUBTITLE_PX = 13
SUBPLOT_TITLE_PX = 16     # plotly's make_subplots titles
COLUMN_PX = 462           # a half-width column, 1400 px window with the sidebar open
CHAR_EM = 0.55            # average character width, in font sizes
MODEBAR_PX = 36           # band at the top of a chart where plotly's modebar shows on hover (28 px) and air
LINE_EM = 1.3             # plotly's line spacing, in font sizes
SUBTITLE_GAP_EM = 1.6     # plotly.js puts the subtitle this many subtitle font sizes below the title
GAP_PX = 12               # between the title block and the plot area


def max_chars(font_px: float) -> int:
    """Characters of one title line that fit a half-width column at this font size."""
    return int(COLUMN_PX / (CHAR_EM * font_px))


def plain(text: str) -> str:
    """Text as drawn: plotly's HTML tags removed, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", text))


def short(text: str, n: int) -> str:
    """At most n characters of text (from a prompt or a vocabulary), with an ellipsis if cut."""
    return text if len(text) <= n else text[:n - 1] + "…"


def titled(title: str, sub: str = "", *, left: int = 60, right: int = 20, bottom: int = 50,
           subplot_titles: bool = False) -> dict:
    """Layout keywords: the title (and subtitle) at the top left under the modebar band, and margins
    whose top holds the band, both lines and, for make_subplots figures, the panel titles."""
    lines = LINE_EM * (TITLE_PX + (SUBPLOT_TITLE_PX if subplot_titles else 0))
    lines += (LINE_EM + SUBTITLE_GAP_EM) * SUBTITLE_PX if sub else 0
    return dict(
        title=dict(text=title, font=dict(size=TITLE_PX), x=0, xref="container", xanchor="left",
                   y=1, yref="container", yanchor="top", pad=dict(t=MODEBAR_PX, l=4),
                   subtitle=dict(text=sub, font=dict(size=SUBTITLE_PX))),
        margin=dict(l=left, r=right, b=bottom, t=math.ceil(MODEBAR_PX + lines + GAP_PX)))


def percent_axis(values) -> dict:
    """Axis keywords for shares drawn as percentages: about five ticks from 0 past the largest value
    on a 1-2-5 step, each label with as many decimals as the step needs, so no two read the same."""
    top = max([v for v in values if math.isfinite(v)] + [0.0])
    top = top if top > 0 else 0.01
    mag = 10 ** math.floor(math.log10(top / 4))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= top / 4)
    ticks = [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]
    decimals = max(0, -math.floor(math.log10(step * 100) + 1e-9))
    return dict(tickmode="array", tickvals=ticks, ticktext=[f"{t * 100:.{decimals}f}%" for t in ticks],
                range=[0, ticks[-1] * 1.02])
