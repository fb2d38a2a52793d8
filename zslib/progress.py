"""Progress bars for long loops: tqdm's text bar, in notebooks too.

``tqdm.auto`` would draw a widget in Jupyter, which needs ipywidgets (without it every notebook opened
with a warning), and a widget bar that papermill saves keeps the state it was drawn with. A text bar
updates in place live, and ``zslib.pipeline`` runs notebooks with streams coalesced, so each bar
leaves one line in the saved notebook.
"""

from __future__ import annotations

from tqdm.std import tqdm as _tqdm


def tqdm(*args, **kwargs):
    """``tqdm.std.tqdm`` with a refresh at most every second (fewer stream messages to store)."""
    kwargs.setdefault("mininterval", 1.0)
    return _tqdm(*args, **kwargs)
