import json

import pytest

from zslib.data import DataError, load_qa


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_loads_local_jsonl_in_unified_schema(tmp_path):
    f = _write(tmp_path / "test.jsonl", [
        {"id": "a", "question": "who wrote it", "golden_answers": ["Someone", "S. One"], "extra": 1},
        {"question": "where?", "golden_answers": [1990]},
    ])
    ds = load_qa("nq", "test", f)
    assert ds.column_names == ["id", "question", "golden_answers", "dataset"]
    assert ds[0]["golden_answers"] == ["Someone", "S. One"]
    assert ds[1]["id"] == "test_1" and ds[1]["golden_answers"] == ["1990"]


def test_loads_a_folder_and_parquet(tmp_path):
    import datasets
    datasets.Dataset.from_list([{"id": "x", "question": "q?", "golden_answers": ["a"]}]).to_parquet(str(tmp_path / "dev.parquet"))
    ds = load_qa("hotpotqa", "dev", tmp_path)
    assert len(ds) == 1 and ds[0]["dataset"] == "hotpotqa"


@pytest.mark.parametrize("bad,field", [
    ({"golden_answers": ["a"]}, "question"),
    ({"question": "  ", "golden_answers": ["a"]}, "question"),
    ({"question": "q?", "golden_answers": []}, "golden_answers"),
    ({"question": "q?", "golden_answers": "a"}, "golden_answers"),
    ({"question": "q?", "golden_answers": ["", "b"]}, "golden_answers"),
])
def test_malformed_row_names_file_row_and_field(tmp_path, bad, field):
    f = _write(tmp_path / "train.jsonl", [{"question": "fine?", "golden_answers": ["ok"]}, bad])
    with pytest.raises(DataError) as e:
        load_qa("nq", "train", f)
    assert str(f) in str(e.value) and "row 2" in str(e.value) and field in str(e.value)


def test_broken_json_names_row(tmp_path):
    f = _write(tmp_path / "test.jsonl", [{"question": "a?", "golden_answers": ["b"]}, "{not json"])
    with pytest.raises(DataError, match="test.jsonl, line 2: not valid JSON"):
        load_qa("nq", "test", f)


def test_tiny_world_keeps_metadata(tiny_world):
    ds = load_qa("tiny", "test", tiny_world["dir"])
    assert len(ds) == len(tiny_world["splits"]["test"])
    assert {"hops", "relation", "subject", "supporting_titles"} <= set(ds.column_names)


def test_two_hop_questions_carry_their_hop_answers(tiny_world):
    ds = load_qa("tiny", "test", tiny_world["dir"]).to_list()
    by_name = {e["name"]: e for e in tiny_world["entities"]}
    two_hop = [r for r in ds if r["hops"] == 2]
    assert two_hop and all(r["hop_answers"] == [] for r in ds if r["hops"] == 1)
    for r in two_hop:
        bridge, final = r["hop_answers"]
        first, second = r["relation"].split("/")
        # the bridge is the subject's fact for the first relation, the answer the bridge's for the second
        assert by_name[r["subject"]]["facts"][first] == bridge and by_name[bridge]["facts"][second] == final
        assert r["golden_answers"] == [final]


@pytest.mark.parametrize("hops,message", [("Masa", "list of non-empty strings"), (["Bridge", ""], "non-empty"),
                                          (["Bridge", "Elsewhere"], "end with a gold answer")])
def test_malformed_hop_answers_name_the_row(tmp_path, hops, message):
    f = _write(tmp_path / "test.jsonl", [{"question": "q?", "golden_answers": ["Masa"], "hop_answers": ["B", "Masa"]},
                                         {"question": "q2?", "golden_answers": ["Masa"], "hop_answers": hops}])
    with pytest.raises(DataError, match=f"row 2: field 'hop_answers' must .*{message}"):
        load_qa("mine", "test", f)


def test_unknown_dataset_is_an_error():
    with pytest.raises(DataError, match="unknown dataset"):
        load_qa("no-such-set", "test")


def test_profile_reads_a_local_copy_before_the_hub(tmp_path):
    from zslib.config import ROOT, load_profile
    from zslib.data import load_for_profile
    p = load_profile("qwen3-0.6b", overrides={"data.local_dir": str(ROOT / "data")})
    ds = load_for_profile(p, "flashrag_sample", "test")
    assert len(ds) == 5 and ds[1]["golden_answers"] == ["Jane Austen", "Austen"]


def test_a_users_own_dataset_by_path_with_any_name(tmp_path):
    from zslib import config, data

    file = tmp_path / "my_questions.jsonl"
    file.write_text(json.dumps({"id": "a", "question": "Who?", "golden_answers": ["Ann"]}) + "\n")
    profile = config.load_profile("tiny")
    rows = data.load_for_profile(profile, str(file), data.eval_split(str(file))).to_list()
    assert rows == [{"id": "a", "question": "Who?", "golden_answers": ["Ann"], "dataset": "my_questions"}]
    assert data.eval_split("my_questions") == "test" and data.eval_split("hotpotqa") == "dev"
    with pytest.raises(data.DataError, match="dataset 'no_such_set'.*not a FlashRAG name"):
        data.load_for_profile(profile, "no_such_set", "test")
