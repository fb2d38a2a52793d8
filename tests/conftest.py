import json

import pytest
import torch

from zslib.tiny import world
from zslib.search import BM25Engine

torch.set_num_threads(2)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """The default world written once for the session: paths, rows per split, articles."""
    out = tmp_path_factory.mktemp("world")
    paths = world.write_world(world.WorldConfig(), out)
    return {"paths": paths, "dir": out,
            "splits": {s: read_jsonl(paths[s]) for s in world.SPLITS},
            "articles": read_jsonl(paths["corpus"]),
            "entities": read_jsonl(paths["entities"])}


@pytest.fixture(scope="session")
def bm25(tiny_world, tmp_path_factory):
    return BM25Engine(tiny_world["paths"]["corpus"], tmp_path_factory.mktemp("bm25"))


@pytest.fixture(scope="session")
def tokenizer(tiny_world, tmp_path_factory):
    from zslib.tiny import tokenizer as tiny_tokenizer
    texts = tiny_tokenizer.tokenizer_texts(tiny_world["articles"], tiny_world["splits"]["train"])
    return tiny_tokenizer.train_tokenizer(texts, 1000, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def protocol_model(tokenizer, tiny_world, bm25, tmp_path_factory):
    """A small model overfit on scripted demonstrations of 16 questions: it searches, reads and
    answers on its own, so rollouts with it exercise every branch of the real loop."""
    from zslib.tiny import pretraining, recipes
    from zslib.config import TinyConfig

    cfg = TinyConfig(hidden_size=96, intermediate_size=192, num_layers=2, num_heads=2, num_kv_heads=1,
                     lr=3e-3, warmup_steps=5, batch_tokens=4096, bf16_autocast=False)
    rows = [r for r in tiny_world["splits"]["train"] if r["hops"] == 1][:16]
    by_name = {e["name"]: e for e in tiny_world["entities"]}
    demos = recipes.scripted_demos(tokenizer, rows, bm25, by_name, set(), topk=3, seed=0, per_question=2)
    model = pretraining.build_model(tokenizer, cfg, seed=0)
    pretraining.pretrain(model, demos, 150, cfg, tmp_path_factory.mktemp("protocol") / "loss.jsonl", seed=0)
    return model.eval(), rows
