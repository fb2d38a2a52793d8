"""A seeded synthetic encyclopedia: the tiny offline profile's stand-in for Wikipedia.

Entities of seven types carry relations to each other (author, birthplace, capital, ...).
Every entity gets one short article whose sentences state its facts in the same words the
questions use, so a small model can learn to find "born in" next to a name and copy what
follows. Questions come in FlashRAG form (``id``, ``question``, ``golden_answers``) plus
metadata. Splits are made per subject entity, so a test question's facts never appear in a
train question; 2-hop questions are kept only when both hops' subjects share a split.

Same seed -> byte-identical files (sorted keys, fixed iteration order, no set ordering).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..files import read_jsonl, write_jsonl

SPLITS = ("train", "dev", "test")

# Syllables for invented names. Kept short so that BPE with ~1k merges learns them as
# pieces and a name unseen in training still splits the way seen ones do.
_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s",
           "st", "t", "tr", "v", "z", "th", "sh", "qu"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io", "ou"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "m", "x", "nd", "rk"]
_ADJECTIVES = ["Silent", "Hidden", "Broken", "Golden", "Crimson", "Distant", "Frozen", "Hollow",
               "Last", "Lost", "Quiet", "Restless", "Scarlet", "Secret", "Silver", "Sleeping",
               "Stolen", "Wandering", "Winter", "Burning", "Forgotten", "Painted", "Endless", "Bitter"]
_NOUNS = ["Harbor", "Garden", "Mirror", "River", "Tower", "Lantern", "Orchard", "Voyage", "Archive",
          "Compass", "Meadow", "Signal", "Bridge", "Island", "Kingdom", "Letter", "Machine",
          "Empire", "Forest", "Window", "Promise", "Horizon", "Shadow", "Season"]
TITLE_WORDS = (_ADJECTIVES, _NOUNS)  # book and film titles: "The Silent Harbor of X", "Silent Harbor in X"
_OCCUPATIONS = ["painter", "chemist", "poet", "engineer", "historian", "composer", "architect",
                "physician", "novelist", "astronomer", "sculptor", "economist", "botanist", "lawyer"]
_INDUSTRIES = ["shipping", "textiles", "software", "mining", "publishing", "aviation", "brewing",
               "banking", "glassmaking", "railways", "pharmaceuticals", "telescopes"]
_GENRES = ["drama", "comedy", "thriller", "documentary", "western", "musical", "mystery", "fantasy"]


@dataclass
class WorldConfig:
    seed: int = 0
    n_countries: int = 60
    n_cities: int = 420
    n_people: int = 900
    n_books: int = 340
    n_films: int = 220
    n_companies: int = 220
    n_universities: int = 140
    split_fractions: list = field(default_factory=lambda: [0.7, 0.1, 0.2])


# One template per relation: the question, and the article sentence that answers it.
# The sentence is what BM25 must find and what the policy must learn to read.
RELATIONS = {
    "capital":        ("country", "city",       "What is the capital of {s}?",           "The capital of {s} is {o}."),
    "located_in":     ("city",    "country",    "In which country is {s} located?",      "{s} is a city located in {o}."),
    "born_in":        ("person",  "city",       "Where was {s} born?",                   "{s} was born in {o}."),
    "birth_year":     ("person",  "year",       "In which year was {s} born?",           "{s} was born in the year {o}."),
    "educated_at":    ("person",  "university", "Where did {s} study?",                  "{s} studied at {o}."),
    "author":         ("book",    "person",     "Who wrote {s}?",                        "{s} is a book written by {o}."),
    "published":      ("book",    "year",       "When was {s} published?",               "{s} was published in {o}."),
    "director":       ("film",    "person",     "Who directed {s}?",                     "{s} is a film directed by {o}."),
    "founder":        ("company", "person",     "Who founded {s}?",                      "{s} was founded by {o}."),
    "headquarters":   ("company", "city",       "Where is {s} headquartered?",           "{s} is headquartered in {o}."),
    "university_city": ("university", "city",   "In which city is {s}?",                 "{s} is a university in the city of {o}."),
}

# The keyword a terse query adds to a subject's name ("Zorbak Melu born"): the scripted
# demonstrations write such queries, so the simulator's training and test queries do too.
RELATION_KEYWORDS = {"capital": "capital", "located_in": "country", "born_in": "born", "birth_year": "born year",
                     "educated_at": "studied", "author": "written by", "published": "published",
                     "director": "directed by", "founder": "founded by", "headquarters": "headquartered",
                     "university_city": "city"}

# What a question of each relation asks for, as the scripted demonstrations name it at the start
# of their first thought ("<think> This asks for a birthplace."): the decision to search or to
# answer from memory is then made right after words that name the relation (see tiny.first_thought).
RELATION_TOPICS = {"capital": "a capital", "located_in": "a country", "born_in": "a birthplace",
                   "birth_year": "a birth year", "educated_at": "a university", "author": "an author",
                   "published": "a publication year", "director": "a director", "founder": "a founder",
                   "headquarters": "a headquarters", "university_city": "a campus town"}

# 2-hop chains: first relation maps the subject to a bridge entity, the second to the answer.
TWO_HOP = {
    ("author", "born_in"):          "Where was the author of {s} born?",
    ("author", "birth_year"):       "In which year was the author of {s} born?",
    ("director", "born_in"):        "Where was the director of {s} born?",
    ("founder", "educated_at"):     "Where did the founder of {s} study?",
    ("headquarters", "located_in"): "In which country is the headquarters of {s}?",
    ("born_in", "located_in"):      "In which country was {s} born?",
    ("located_in", "capital"):      "What is the capital of the country where {s} is located?",
    ("educated_at", "university_city"): "In which city did {s} study?",
}


class Namer:
    """Invents unique capitalised names from syllables."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def word(self, min_syl=2, max_syl=3, suffix="") -> str:
        while True:
            n = self.rng.randint(min_syl, max_syl)
            w = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(n - 1))
            w += self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)
            w = (w + suffix).capitalize()
            if w not in self.used:
                self.used.add(w)
                return w

    def unique(self, make) -> str:
        while True:
            name = make()
            if name not in self.used:
                self.used.add(name)
                return name


def build_world(cfg: WorldConfig) -> dict:
    """Entities with attributes and relations; returns {"entities": [...]} sorted by id."""
    rng = random.Random(cfg.seed)
    namer = Namer(rng)
    ents: list[dict] = []
    counts: dict[str, int] = {}

    def add(kind: str, name: str) -> dict:
        counts[kind] = counts.get(kind, 0) + 1
        e = {"id": f"{kind}-{counts[kind] - 1:04d}", "type": kind, "name": name, "facts": {}}
        ents.append(e)
        return e

    countries = [add("country", namer.word(2, 3, rng.choice(["ia", "and", "or", "esh", ""])))
                 for _ in range(cfg.n_countries)]
    cities = [add("city", namer.word(2, 2)) for _ in range(cfg.n_cities)]
    for c in cities:
        c["facts"]["located_in"] = rng.choice(countries)["name"]
    # Every country gets a capital among its own cities when it has one.
    for country in countries:
        own = [c for c in cities if c["facts"]["located_in"] == country["name"]]
        if not own:
            own = [rng.choice(cities)]
            own[0]["facts"]["located_in"] = country["name"]
        country["facts"]["capital"] = rng.choice(own)["name"]
    universities = [add("university", namer.unique(lambda: f"{namer.word(2, 2)} {rng.choice(['University', 'College', 'Institute'])}"))
                    for _ in range(cfg.n_universities)]
    for u in universities:
        u["facts"]["university_city"] = rng.choice(cities)["name"]
    people = [add("person", namer.unique(lambda: f"{namer.word(2, 2)} {namer.word(2, 2)}"))
              for _ in range(cfg.n_people)]
    for p in people:
        p["facts"]["born_in"] = rng.choice(cities)["name"]
        p["facts"]["birth_year"] = str(rng.randint(1780, 1990))
        p["facts"]["educated_at"] = rng.choice(universities)["name"]
        p["occupation"] = rng.choice(_OCCUPATIONS)
    books = [add("book", namer.unique(lambda: f"The {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} of {namer.word(2, 2)}"))
             for _ in range(cfg.n_books)]
    for b in books:
        b["facts"]["author"] = rng.choice(people)["name"]
        b["facts"]["published"] = str(rng.randint(1820, 2020))
    films = [add("film", namer.unique(lambda: f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} in {namer.word(2, 2)}"))
             for _ in range(cfg.n_films)]
    for f in films:
        f["facts"]["director"] = rng.choice(people)["name"]
        f["genre"] = rng.choice(_GENRES)
    companies = [add("company", namer.unique(lambda: f"{namer.word(2, 2)} {rng.choice(['Industries', 'Works', 'Group', 'Company'])}"))
                 for _ in range(cfg.n_companies)]
    for c in companies:
        c["facts"]["founder"] = rng.choice(people)["name"]
        c["facts"]["headquarters"] = rng.choice(cities)["name"]
        c["industry"] = rng.choice(_INDUSTRIES)
    return {"entities": ents}


def article(e: dict) -> dict:
    """One short article: an opening sentence naming the type, then one sentence per fact."""
    name, kind = e["name"], e["type"]
    opening = {
        "person": f"{name} is a {e.get('occupation', 'person')}.",
        "city": f"{name} is a city.",
        "country": f"{name} is a country.",
        "book": f"{name} is a novel.",
        "film": f"{name} is a {e.get('genre', '')} film.",
        "company": f"{name} is a {e.get('industry', '')} company.",
        "university": f"{name} is a university.",
    }[kind]
    sentences = [opening] + [RELATIONS[r][3].format(s=name, o=o) for r, o in e["facts"].items()]
    return {"id": e["id"], "title": name, "text": " ".join(sentences)}


def make_questions(world: dict, cfg: WorldConfig) -> dict[str, list[dict]]:
    """1-hop and 2-hop questions per split, split by subject entity."""
    rng = random.Random(cfg.seed + 1)
    ents = world["entities"]
    by_name = {e["name"]: e for e in ents}
    frac = cfg.split_fractions
    split_of = {}
    for e in ents:
        u = rng.random()
        split_of[e["name"]] = "train" if u < frac[0] else ("dev" if u < frac[0] + frac[1] else "test")
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for e in ents:
        for rel, obj in e["facts"].items():
            out[split_of[e["name"]]].append({
                "question": RELATIONS[rel][2].format(s=e["name"]), "golden_answers": [obj],
                "hops": 1, "relation": rel, "subject": e["name"], "supporting_titles": [e["name"]]})
    for e in ents:
        for (r1, r2), template in TWO_HOP.items():
            bridge_name = e["facts"].get(r1)
            bridge = by_name.get(bridge_name) if bridge_name else None
            if bridge is None or r2 not in bridge["facts"] or split_of[bridge_name] != split_of[e["name"]]:
                continue
            out[split_of[e["name"]]].append({
                "question": template.format(s=e["name"]), "golden_answers": [bridge["facts"][r2]],
                "hops": 2, "relation": f"{r1}/{r2}", "subject": e["name"],
                "supporting_titles": [e["name"], bridge_name],
                "hop_answers": [bridge_name, bridge["facts"][r2]]})  # what each hop's search should find
    for split, rows in out.items():
        rng.shuffle(rows)
        for i, row in enumerate(rows):
            row["id"] = f"{split}_{i}"
    return out


def write_world(cfg: WorldConfig, out_dir: str | Path) -> dict[str, Path]:
    """Build the world and write entities, corpus and question splits as JSONL."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    world = build_world(cfg)
    questions = make_questions(world, cfg)
    paths = {"entities": out_dir / "entities.jsonl", "corpus": out_dir / "corpus.jsonl"}
    write_jsonl(paths["entities"], world["entities"])
    # Search-R1's corpus form: {"id", "contents": '"Title"\ntext'}, plus plain title/text.
    corpus = []
    for e in world["entities"]:
        a = article(e)
        corpus.append({"id": a["id"], "title": a["title"], "text": a["text"],
                       "contents": f"\"{a['title']}\"\n{a['text']}"})
    write_jsonl(paths["corpus"], corpus)
    for split in SPLITS:
        paths[split] = out_dir / f"{split}.jsonl"
        write_jsonl(paths[split], questions[split])
    return paths


def invented_world(cfg: WorldConfig, seed: int, taken: set[str]) -> tuple[list[dict], dict[str, dict]]:
    """1-hop questions and articles from an independent world whose subjects' names are not in
    ``taken``: facts no model has seen, so a simulator asked about them can only copy the answer
    from its prompt (docs/method.md §12)."""
    other = build_world(dataclasses.replace(cfg, seed=seed))
    articles = {e["name"]: article(e) for e in other["entities"] if e["name"] not in taken}
    questions = [q for rows in make_questions(other, cfg).values() for q in rows
                 if q["hops"] == 1 and q["subject"] in articles]
    return questions, articles


def load_entities(path: str | Path) -> list[dict]:
    return read_jsonl(path)
