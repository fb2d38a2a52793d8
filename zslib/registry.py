"""One mapping from name to implementation per choice a profile makes.

``ALGORITHMS`` in ``algos.py``, ``REWARDS`` in ``reward.py``, ``SCHEDULES`` in ``curriculum.py`` and
the others are each a ``Registry``: the profile's dataclasses (``config.py``) check a name against
it when the profile loads, and the code that runs the choice looks the name up in the same mapping.
Adding an implementation is one entry; nothing else lists the names.
"""

from __future__ import annotations


class Registry(dict):
    """``{name: implementation}`` for the profile key ``key`` (e.g. ``"rl.algorithm"``). Looking up
    an unknown name is an error that lists the known ones."""

    def __init__(self, key: str, entries: dict):
        super().__init__(entries)
        self.key = key

    def __missing__(self, name):
        raise ValueError(f"{self.key} must be one of {', '.join(self)}, not {name!r}")
