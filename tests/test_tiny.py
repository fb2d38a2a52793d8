import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from zslib.tiny import base_eval, pretraining, recipes
from zslib.config import TinyConfig
from zslib.prompts import TAGS, information_block, render_policy_prompt
from zslib.search import Doc


def test_tokenizer_round_trips_world_and_protocol_text(tokenizer, tiny_world):
    texts = [a["text"] for a in tiny_world["articles"][:200]]
    texts.append(render_policy_prompt(tokenizer, "Where was Xo Ba born?")
                 + "<think> hm </think>\n<search> Xo Ba </search>" + information_block([Doc("Xo Ba", "Xo Ba é ✓.")]))
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_vocabulary_is_small_and_tags_are_atomic(tokenizer):
    assert 1000 < len(tokenizer) < 1400
    for tag in TAGS:
        assert len(tokenizer(tag, add_special_tokens=False)["input_ids"]) == 1


def test_unseen_names_split_into_pieces(tokenizer):
    # A fresh syllable name is spelled with several tokens, like the names seen in training.
    assert len(tokenizer.tokenize(" Vorquelindrax")) >= 3


def test_chat_template_and_padding(tokenizer):
    prompt = render_policy_prompt(tokenizer, "who is it")
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    assert "Question: who is it?" in prompt
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token == "<|im_end|>"


def test_model_saves_and_loads_through_auto_classes(tokenizer, tmp_path):
    cfg = TinyConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=1)
    model = pretraining.build_model(tokenizer, cfg, seed=0).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "Qwen3ForCausalLM"
    ids = tok2("Where was Xo Ba born?", return_tensors="pt")["input_ids"]
    assert ids.tolist() == tokenizer("Where was Xo Ba born?", return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_demonstrations_never_train_the_prompt(tokenizer, tiny_world, bm25):
    by_name = {e["name"]: e for e in tiny_world["entities"]}
    rows = tiny_world["splits"]["train"][:60]
    for train_docs in (False, True):
        demos = recipes.scripted_demos(tokenizer, rows, bm25, by_name, set(), topk=3, seed=0, per_question=1,
                                    train_docs=train_docs)
        assert len(demos) == 60
        searched = 0
        for ex, row in zip(demos, rows):
            trained = tokenizer.decode([t for t, m in zip(ex.ids, ex.mask) if m])
            context = tokenizer.decode([t for t, m in zip(ex.ids, ex.mask) if not m])
            assert context.startswith("<|im_start|>user") and "Question:" not in trained
            response = tokenizer.decode(ex.ids).split("<|im_start|>assistant\n")[1]
            assert ("<information>" in trained) == (train_docs and "<information>" in response)
            assert trained.rstrip().endswith("</answer><|im_end|>")
            searched += "<search>" in trained
        assert searched > 40, "most demonstrations search"


def test_memory_relations_add_answers_without_a_search_and_change_no_other_demonstration(tokenizer, tiny_world, bm25):
    by_name = {e["name"]: e for e in tiny_world["entities"]}
    rows = tiny_world["splits"]["train"][:200]
    plain = recipes.scripted_demos(tokenizer, rows, bm25, by_name, set(), topk=3, seed=0, per_question=1)
    memory = recipes.scripted_demos(tokenizer, rows, bm25, by_name, set(), topk=3, seed=0, per_question=1,
                                 memory_relations=["birth_year"], memory_demos=2)
    year_rows = [r for r in rows if r["relation"].split("/")[-1] == "birth_year"]
    assert year_rows and len(memory) == len(plain) + 2 * len(year_rows)
    assert [e.ids for e in memory[:len(plain)]] == [e.ids for e in plain]
    for ex, row in zip(memory[len(plain):], [r for r in year_rows for _ in range(2)]):
        text = tokenizer.decode(ex.ids)
        trained = tokenizer.decode([t for t, m in zip(ex.ids, ex.mask) if m])
        assert f"Question: {row['question']}" in text
        assert "<search>" not in trained
        assert trained.startswith(recipes.first_thought(row) + recipes.MEMORY_DECISION)
        assert trained.rstrip().endswith("</answer><|im_end|>")


@pytest.mark.parametrize("override", [{"tiny.memory_relations": ["birth_yr"]}, {"tiny.memory_demos": -1}])
def test_bad_memory_settings_name_the_field_when_the_profile_loads(override):
    from zslib.config import ConfigError, load_profile
    with pytest.raises(ConfigError, match=next(iter(override))):
        load_profile("tiny", override)


def test_pretraining_lowers_the_loss(tokenizer, tiny_world, tmp_path):
    cfg = TinyConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
                     lr=3e-3, warmup_steps=5, batch_tokens=2048)
    model = pretraining.build_model(tokenizer, cfg, seed=0)
    examples = recipes.pack_texts(tokenizer, [a["text"] for a in tiny_world["articles"][:300]], 128, seed=0)
    history = pretraining.pretrain(model, examples, 60, cfg, tmp_path / "loss.jsonl", seed=0)
    assert len(pretraining.read_log(tmp_path / "loss.jsonl")) == 60
    first, last = history[0]["loss"], sum(r["loss"] for r in history[-10:]) / 10
    assert last < 0.6 * first


@pytest.mark.parametrize("number_share", [0.0, 0.5])
def test_copy_drills_train_only_the_repeat(tokenizer, number_share):
    drills = recipes.copy_drills(tokenizer, 40, seed=3, number_share=number_share)
    assert len({tuple(d.ids) for d in drills}) == 40, "fresh items every time"
    items = []
    for d in drills:
        first = tokenizer.decode([t for t, m in zip(d.ids, d.mask) if not m])
        repeat = tokenizer.decode([t for t, m in zip(d.ids, d.mask) if m])
        assert first == repeat + "\n"
        items += repeat.split(", ")
    years = [i for i in items if i.isdigit()]
    assert all(len(y) == 4 for y in years)
    if number_share == 0:
        assert not years
    else:  # 140-odd items: the share of years is 0.5 give or take sampling noise
        assert 0.35 < len(years) / len(items) < 0.65


def test_batches_cover_every_example_once_with_few_shapes():
    import random
    rng = random.Random(0)
    examples = [recipes.Example(list(range(n)), [1] * n) for n in (rng.randint(1, 300) for _ in range(2000))]
    batches = pretraining._batches(examples, 4096, random.Random(1), width_multiple=64)
    assert sorted(id(e) for _, b in batches for e in b) == sorted(id(e) for e in examples)
    for width, b in batches:
        assert width % 64 == 0 and all(width - 64 < len(e.ids) <= width for e in b)
        assert len(b) * width <= 4096
    shapes = {(len(b), width) for width, b in batches}
    assert len(shapes) <= 2 * 5, "one full and one partial batch shape per width"
    batch = pretraining._collate(batches[0][1], pad_id=0, width=batches[0][0])
    assert batch["input_ids"].shape == (len(batches[0][1]), batches[0][0])


def test_answer_drills_state_each_answer_twice_about_unseen_entities(tiny_world):
    from zslib.tiny.world import WorldConfig
    taken = {e["name"] for e in tiny_world["entities"]}
    drills = recipes.answer_drills(WorldConfig(), taken, 50, seed=7)
    assert len(drills) == 50
    for d in drills:
        qa, doc = d.split("\n")
        answer = qa.split(" Answer: ")[1]
        title = doc.split("(Title: ")[1].split(")")[0]
        assert answer in doc and title not in taken and title in qa


def test_every_first_turn_names_what_the_question_asks_for_then_decides(tokenizer, tiny_world, bm25):
    by_name = {e["name"]: e for e in tiny_world["entities"]}
    rows = tiny_world["splits"]["train"][:120]
    demos = recipes.scripted_demos(tokenizer, rows, bm25, by_name, set(), topk=3, seed=0, per_question=1,
                                memory_relations=["born_in"], memory_demos=1)
    memory_rows = [r for r in rows if r["relation"].split("/")[-1] == "born_in"]
    decisions, thoughts = {"search": 0, "memory": 0}, {}
    for ex, row in zip(demos, rows + memory_rows):
        response = tokenizer.decode(ex.ids).split("<|im_start|>assistant\n")[1]
        thoughts.setdefault(row["relation"].split("/")[-1], set()).add(recipes.first_thought(row))
        assert response.startswith(recipes.first_thought(row))
        rest = response[len(recipes.first_thought(row)):]
        decisions["search" if rest.startswith(recipes.SEARCH_DECISION) else "memory"] += 1
        assert rest.startswith((recipes.SEARCH_DECISION, recipes.MEMORY_DECISION))
    assert decisions["memory"] >= len(memory_rows) and decisions["search"] > 80
    # one thought per relation, a different one for each
    assert all(len(t) == 1 for t in thoughts.values()) and len(set.union(*thoughts.values())) == len(thoughts) > 5
    assert thoughts["born_in"] == {"<think> This asks for a birthplace."}


def test_decision_margins_equal_the_two_openings_scored_token_by_token(protocol_model, tokenizer):
    model, rows = protocol_model
    picked = rows[:4]
    margins = base_eval.decision_margins(model, tokenizer, picked, batch_size=3)  # a batch of 3 and one of 5 rows
    for q, margin in zip(picked, margins):
        prompt = tokenizer(render_policy_prompt(tokenizer, q["question"]), add_special_tokens=False)["input_ids"]
        totals = []
        for decision in (recipes.SEARCH_DECISION, recipes.MEMORY_DECISION):
            ids, total = list(prompt), 0.0
            for token in tokenizer(recipes.first_thought(q) + decision, add_special_tokens=False)["input_ids"]:
                with torch.no_grad():
                    logits = model(torch.tensor([ids])).logits[0, -1].float()
                total += torch.log_softmax(logits, -1)[token].item()
                ids.append(token)
            totals.append(total)
        assert margin == pytest.approx(totals[0] - totals[1], abs=1e-3)


# a short build of both bases
SMALL_BASES = {"tiny.hidden_size": 64, "tiny.intermediate_size": 128, "tiny.num_layers": 1, "tiny.num_heads": 2,
               "tiny.num_kv_heads": 1, "tiny.copy_warmup_steps": 3, "tiny.policy_copy_warmup_steps": 3,
               "tiny.copy_drills": 50, "tiny.policy_steps": 4, "tiny.simulator_steps": 3, "tiny.simulator_copy_steps": 2,
               "tiny.answer_drills": 40, "tiny.batch_tokens": 1024, "tiny.copy_warmup_batch_tokens": 512,
               "tiny.simulator_copy_batch_tokens": 512}


def _build_small(tokenizer, tiny_world, bm25, out, name, **edits):
    """(profile, loss logs of the bases trained): a short build of both bases under ``out/name`` (the profile's
    paths point there only inside this call)."""
    from zslib import config

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config.Profile, "out", property(lambda self: Path(out) / self.name))
        profile = config.load_profile("tiny", {**SMALL_BASES, "name": name, **edits})
        splits = {s: rows[:80] for s, rows in tiny_world["splits"].items()}
        return profile, pretraining.build_bases(profile, tokenizer, bm25, tiny_world["articles"][:300],
                                                tiny_world["entities"], splits)


@pytest.fixture(scope="module")
def small_bases(tokenizer, tiny_world, bm25, tmp_path_factory):
    """Both bases built once, small: the outputs folder of run ``a`` (tests that change it copy it first)."""
    out = tmp_path_factory.mktemp("bases")
    _build_small(tokenizer, tiny_world, bm25, out, "a")
    return out / "a"


def test_building_the_bases_twice_gives_the_same_weights(tokenizer, tiny_world, bm25, small_bases, tmp_path):
    """Same seed, same machine: byte-identical bases (a short build of both)."""
    _build_small(tokenizer, tiny_world, bm25, tmp_path, "b")
    models = tmp_path / "b" / "models"
    for name in ("policy-base", "simulator-base"):
        assert (models / name / "model.safetensors").read_bytes() == \
            (small_bases / "models" / name / "model.safetensors").read_bytes(), name
    # Each base has its own warm-up: the policy's drills hold years and titles, the simulator's do not.
    warm = {name: [r["loss"] for r in pretraining.read_log(models / f"{name}.loss.jsonl")
                   if r["phase"] == "copy warm-up"] for name in ("policy-base", "simulator-base")}
    assert len(warm["policy-base"]) == len(warm["simulator-base"]) == 3
    assert warm["policy-base"] != warm["simulator-base"]


def test_a_kept_base_of_another_recipe_is_refused_and_one_bases_setting_leaves_the_other_current(
        tokenizer, tiny_world, bm25, small_bases, tmp_path):
    shutil.copytree(small_bases, tmp_path / "run", symlinks=True)

    def build(name="run", **edits):
        return _build_small(tokenizer, tiny_world, bm25, tmp_path, name, **edits)

    models = tmp_path / "run" / "models"
    assert json.loads((models / "policy-base" / "recipe.json").read_text())["tiny"]["policy_steps"] == 4
    assert build()[1] == {}, "the same recipe: both kept"
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    for edit, changed in (({"tiny.policy_steps": 5}, "policy-base"), ({"tiny.simulator_steps": 4}, "simulator-base"),
                          ({"tiny.lr": 1e-3}, "simulator-base"), ({"seed": 1}, "simulator-base")):
        key = next(iter(edit))
        with pytest.raises(ValueError, match=rf"{changed}/recipe\.json: .*{key}: .* -> "):
            build(**edit)
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before, "nothing touched"
    # A policy-only setting with the policy base deleted: only it is trained, the simulator base is current.
    shutil.rmtree(models / "policy-base")
    assert sorted(build(**{"tiny.policy_steps": 5})[1]) == ["policy-base"]
    # A base linked in from another run (benchmarks/seeds.py shares seed 0's simulator) is that run's to check.
    (tmp_path / "other" / "models").mkdir(parents=True)
    (tmp_path / "other" / "models" / "simulator-base").symlink_to(models / "simulator-base", target_is_directory=True)
    assert sorted(build("other", **{"tiny.lr": 1e-3})[1]) == ["policy-base"]


def test_copy_drills_mix_in_titles_made_of_the_worlds_title_words(tokenizer):
    from zslib.tiny.world import TITLE_WORDS
    adjectives, nouns = TITLE_WORDS
    items = []
    for d in recipes.copy_drills(tokenizer, 60, seed=5, number_share=0.2, title_share=0.5):
        items += tokenizer.decode([t for t, m in zip(d.ids, d.mask) if m]).split(", ")
    titles = [i for i in items if i.split()[0] in adjectives + ["The"]]
    assert 0.25 < len(titles) / len(items) < 0.55, "half of the non-year items, give or take"
    for t in titles:
        words = t.split()
        adjective, noun = (words[1], words[2]) if words[0] == "The" else (words[0], words[1])
        assert adjective in adjectives and noun in nouns and words[-2] in ("of", "in")
    assert recipes.copy_drills(tokenizer, 5, seed=5) == recipes.copy_drills(tokenizer, 5, seed=5, title_share=0.0)


def test_guesses_carry_no_loss_without_guess_loss_but_recalled_answers_do(tokenizer, tiny_world, bm25):
    by_name = {e["name"]: e for e in tiny_world["entities"]}
    rows = [r for r in tiny_world["splits"]["train"] if r["relation"] == "born_in"][:6]
    known = {rows[0]["subject"]}
    demos = recipes.scripted_demos(tokenizer, rows, bm25, by_name, known, topk=3, seed=0, per_question=1,
                                memory_relations=["born_in"], memory_demos=1, guess_loss=False)
    for ex, row in zip(demos[len(rows):], rows):  # the memory demonstrations, one per question
        trained = tokenizer.decode([t for t, m in zip(ex.ids, ex.mask) if m])
        said = tokenizer.decode(ex.ids).split("<answer>")[-1].split("</answer>")[0].strip()
        if row["subject"] in known:  # recalled: the right answer, trained
            assert said == row["golden_answers"][0] and f"<answer> {said} </answer>" in trained
        else:  # guessed: in the text, not in the loss
            assert said != row["golden_answers"][0]
            assert trained == recipes.first_thought(row) + recipes.MEMORY_DECISION + " </answer><|im_end|>"
