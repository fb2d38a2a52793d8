import hashlib

from zslib.tiny import world


def _digest(paths):
    return {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in paths.items()}


def test_same_seed_gives_byte_identical_files(tmp_path, tiny_world):
    again = world.write_world(world.WorldConfig(), tmp_path)
    assert _digest(again) == _digest(tiny_world["paths"])


def test_other_seed_gives_other_world(tmp_path, tiny_world):
    other = world.write_world(world.WorldConfig(seed=1), tmp_path)
    assert _digest(other)["corpus"] != _digest(tiny_world["paths"])["corpus"]


def test_size_types_and_relations(tiny_world):
    ents = tiny_world["entities"]
    assert len(ents) >= 2000
    assert len({e["type"] for e in ents}) >= 6
    relations = {r for e in ents for r in e["facts"]}
    assert len(relations) >= 8
    names = [e["name"] for e in ents]
    assert len(set(names)) == len(names), "entity names must be unique"


def test_every_fact_is_stated_in_its_article(tiny_world):
    articles = {a["title"]: a["text"] for a in tiny_world["articles"]}
    for e in tiny_world["entities"]:
        for rel, obj in e["facts"].items():
            assert world.RELATIONS[rel][3].format(s=e["name"], o=obj) in articles[e["name"]]


def test_answers_follow_from_the_facts(tiny_world):
    by_name = {e["name"]: e for e in tiny_world["entities"]}
    for rows in tiny_world["splits"].values():
        for r in rows:
            if r["hops"] == 1:
                assert by_name[r["subject"]]["facts"][r["relation"]] == r["golden_answers"][0]
            else:
                r1, r2 = r["relation"].split("/")
                bridge = by_name[r["subject"]]["facts"][r1]
                assert by_name[bridge]["facts"][r2] == r["golden_answers"][0]
                assert r["supporting_titles"] == [r["subject"], bridge]


def test_splits_use_disjoint_facts(tiny_world):
    splits = tiny_world["splits"]

    def facts(rows):
        out = set()
        for r in rows:
            if r["hops"] == 1:
                out.add((r["subject"], r["relation"]))
            else:
                r1, r2 = r["relation"].split("/")
                out |= {(r["supporting_titles"][0], r1), (r["supporting_titles"][1], r2)}
        return out

    train, dev, test = (facts(splits[s]) for s in world.SPLITS)
    assert not train & test and not train & dev and not dev & test
    for split in world.SPLITS:
        assert sum(r["hops"] == 1 for r in splits[split]) > 0
        assert sum(r["hops"] == 2 for r in splits[split]) > 0


def test_flashrag_fields(tiny_world):
    for split, rows in tiny_world["splits"].items():
        ids = [r["id"] for r in rows]
        assert len(set(ids)) == len(ids)
        for r in rows[:50]:
            assert r["id"].startswith(split)
            assert r["question"].endswith("?")
            assert isinstance(r["golden_answers"], list) and r["golden_answers"][0]
