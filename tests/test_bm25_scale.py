"""The BM25 scale benchmark runs at a small size: every phase reports, and the cached index opens without
reading the corpus."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_bm25_scale_benchmark_builds_opens_and_queries_a_synthetic_corpus(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bm25_scale", ROOT / "benchmarks" / "bm25_scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--passages", "1500,3000", "--queries", "32", "--dir", str(tmp_path)])
    small, result = json.loads((tmp_path / "results.json").read_text())
    assert small["passages"] == 1500 and small["build"]["index_gib"] < result["build"]["index_gib"]
    rows = (tmp_path / "corpus-3000.jsonl").read_text().splitlines()
    assert len(rows) == 3000 and len(json.loads(rows[7])["contents"].split("\n")[1].split()) == 100
    build, query = result["build"], result["query"]
    assert build["passages"] == 3000 and build["seconds"] > 0 and build["index_gib"] > 0
    assert build["peak_gib"] >= build["base_gib"] > 0
    assert query["open_corpus_bytes"] == 0  # the cached index opened from its folder alone
    assert all(query[k] > 0 for k in query if k.startswith("qps_"))
    table = capsys.readouterr().out
    assert "| measure | 1,500 passages | 3,000 passages | wiki-18 (21,015,324), extrapolated |" in table
    assert "| open: corpus bytes read | 0 | 0 | - |" in table
    # the extrapolation is affine through the two sizes: 1 and 2 at 1,000 and 2,000 give 2 + 1 per 1,000 more
    assert bench.extrapolate([1000, 2000], [1.0, 2.0], "index on disk (GiB)", target=5000) == 5.0
    assert bench.extrapolate([1000, 2000], [100.0, 50.0], "queries/s, batch 1, 1 thread", target=5000) == 20.0
