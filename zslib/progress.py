"""Progress bars for long loops: tqdm's text bar, in notebooks too.

``tqdm.auto`` would draw a widget in Jupyter, which needs ipywidgets (without it every notebook opened
with a warning), and a widget bar that papermill saves keeps the state it was drawn with. A text bar
updates in place live, and ``zslib.pipeline`` runs notebooks with streams coalesced, so each bar
leaves one line in the saved notebook.

Two things a terminal does that a notebook's output does not: move the cursor up and erase a line.
So where the stream is not a terminal, a bar opened inside another one (validation inside the RL loop)
is not drawn, since its cursor moves print a new line at every update there, and a bar that would erase
itself when done (``leave=False``) leaves its one line instead of an empty stderr box.
"""

from __future__ import annotations

import sys

from tqdm.std import tqdm as _tqdm


def _terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def tqdm(*args, **kwargs):
    """``tqdm.std.tqdm`` with a refresh at most every second (fewer stream messages to store), and
    the two notebook rules of the module's docstring."""
    kwargs.setdefault("mininterval", 1.0)
    if not _terminal(kwargs.get("file") or sys.stderr):
        if any(not bar.disable for bar in list(_tqdm._instances)):
            kwargs["disable"] = True
        kwargs["leave"] = True
    return _tqdm(*args, **kwargs)
