import json

import pytest
import torch

from zslib import world
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
    from zslib import tiny
    texts = tiny.tokenizer_texts(tiny_world["articles"], tiny_world["splits"]["train"])
    return tiny.train_tokenizer(texts, 1000, tmp_path_factory.mktemp("tok"))
