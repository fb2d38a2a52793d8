import io

from zslib.progress import tqdm


class Terminal(io.StringIO):
    def isatty(self):
        return True


def last_line(text: str) -> str:
    """What a notebook shows of a stream: each line as its last carriage return left it."""
    return [line.split("\r")[-1] for line in text.split("\n") if line.split("\r")[-1].strip()][-1]


def test_outside_a_terminal_a_nested_bar_is_not_drawn_and_a_transient_bar_leaves_its_line():
    out = io.StringIO()
    outer = tqdm(total=2, desc="train", file=out)
    inner = tqdm(range(3), desc="validation", file=out, leave=False)
    assert inner.disable and not outer.disable
    list(inner)
    outer.update(2)
    outer.close()
    assert "validation" not in out.getvalue()
    assert last_line(out.getvalue()).startswith("train: 100%")

    after = tqdm(range(4), desc="evaluate", file=out, leave=False)  # no bar open: drawn again
    assert not after.disable
    list(after)
    after.close()
    assert "4/4" in last_line(out.getvalue()) and last_line(out.getvalue()).startswith("evaluate")


def test_in_a_terminal_bars_nest_and_transient_ones_erase_themselves():
    out = Terminal()
    outer = tqdm(total=1, desc="train", file=out)
    inner = tqdm(range(2), desc="validation", file=out, leave=False)
    assert not inner.disable and not outer.disable and inner.leave is False
    list(inner)
    inner.close()
    outer.close()
    assert "validation" in out.getvalue()
