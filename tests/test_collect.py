import json

import pytest

from zslib.collect import collect, read_trajectories
from zslib.config import RolloutConfig


class AnsweringBackend:
    """Answers every prompt at once; raises on call number ``fail_on`` to mimic an interruption."""
    last_logprobs: list = []

    def release(self):
        pass

    def __init__(self, tokenizer, fail_on=None):
        self.tok, self.fail_on, self.n = tokenizer, fail_on, 0

    def generate(self, prompts, max_new_tokens, temperature, top_p, continuing=False):
        self.n += 1
        if self.n == self.fail_on:
            raise KeyboardInterrupt
        return [self.tok("<answer> x </answer>", add_special_tokens=False)["input_ids"] for _ in prompts]


ROWS = [{"id": f"r{i}", "question": f"question {i}", "golden_answers": ["x" if i % 2 else "y"]} for i in range(7)]
NO_SEARCH = lambda qs, ts: ([[] for _ in qs], [None] * len(qs))


def test_interrupted_collection_resumes_without_duplicates(tokenizer, tmp_path):
    path = tmp_path / "trajectories.jsonl"
    cfg = RolloutConfig(batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        collect(AnsweringBackend(tokenizer, fail_on=3), tokenizer, ROWS, NO_SEARCH, cfg, path, temperature=1.0)
    first = read_trajectories(path)
    assert [r["id"] for r in first] == ["r0", "r1", "r2", "r3"], "finished batches are on disk"
    before = path.read_text()
    result = collect(AnsweringBackend(tokenizer), tokenizer, ROWS, NO_SEARCH, cfg, path, temperature=1.0)
    assert result == {"written": 3, "skipped": 4}
    records = read_trajectories(path)
    assert path.read_text().startswith(before), "nothing written before is changed"
    assert sorted(r["id"] for r in records) == [r["id"] for r in ROWS]
    assert [r["em"] for r in records] == [0.0, 1.0] * 3 + [0.0]
    assert collect(AnsweringBackend(tokenizer), tokenizer, ROWS, NO_SEARCH, cfg, path, 1.0)["written"] == 0


def test_a_line_cut_mid_write_is_dropped_and_redone(tokenizer, tmp_path):
    path = tmp_path / "trajectories.jsonl"
    cfg = RolloutConfig(batch_size=4)
    collect(AnsweringBackend(tokenizer), tokenizer, ROWS[:2], NO_SEARCH, cfg, path, temperature=1.0)
    with open(path, "a") as f:
        f.write('{"id": "r2", "sample": 0, "quest')  # the process died here
    assert [r["id"] for r in read_trajectories(path)] == ["r0", "r1"]
    collect(AnsweringBackend(tokenizer), tokenizer, ROWS[:3], NO_SEARCH, cfg, path, temperature=1.0)
    lines = path.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["r0", "r1", "r2"]


def test_a_corrupt_record_in_the_middle_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "trajectories.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"trajectories.jsonl, line 2: not valid JSON"):
        read_trajectories(path)
