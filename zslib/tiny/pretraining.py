"""The tiny Qwen3-architecture models and their pretraining on the CPU (docs/method.md §12).

``build_model`` makes a ``Qwen3Config`` of a few million parameters; ``pretrain`` is a plain
causal-LM loop with a progress bar and a JSONL loss log; ``build_bases`` trains both bases in their
phases (copy warm-up, main corpus, and for the simulator base answer copying) and saves them with
``save_pretrained``, so every later step loads them only through the Auto classes, as it would load
``Qwen/Qwen3-1.7B``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import time
from pathlib import Path

import torch

from ..files import check_recipe, read_jsonl, write_recipe
from ..progress import tqdm
from .recipes import Example, answer_drills, copy_drills, pack_texts, policy_examples, simulator_corpus
from .tokenizer import EOS

def build_model(tokenizer, cfg, seed: int):
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=cfg.max_positions, tie_word_embeddings=True, rope_theta=10000.0,
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.convert_tokens_to_ids(EOS), tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id)
    return model


def _batches(examples: list[Example], batch_tokens: int, rng: random.Random,
             width_multiple: int = 64) -> list[tuple[int, list[Example]]]:
    """(width, examples) batches of about ``batch_tokens`` padded tokens, in random order.

    Examples are bucketed by length rounded up to ``width_multiple`` and every batch of a bucket
    is padded to that width, so training sees only a few tensor shapes. (With a new shape at
    nearly every step, CPU bf16 autocast kept growing memory: notebook 00 peaked at 6 GB, now 2.)
    """
    buckets: dict[int, list[int]] = {}
    for i, e in enumerate(examples):
        buckets.setdefault(-(-len(e.ids) // width_multiple) * width_multiple, []).append(i)
    batches = []
    for width, members in sorted(buckets.items()):
        rng.shuffle(members)
        rows = max(1, batch_tokens // width)
        batches += [(width, members[k:k + rows]) for k in range(0, len(members), rows)]
    rng.shuffle(batches)
    return [(width, [examples[i] for i in b]) for width, b in batches]


def _collate(batch: list[Example], pad_id: int, width: int | None = None) -> dict:
    width = width or max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    for r, e in enumerate(batch):  # right padding: positions start at 0 as in generation
        n = len(e.ids)
        ids[r, :n] = torch.tensor(e.ids)
        attn[r, :n] = 1
        m = torch.tensor(e.mask, dtype=torch.bool)
        labels[r, :n] = torch.where(m, ids[r, :n], torch.full_like(ids[r, :n], -100))
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def pretrain(model, examples: list[Example], steps: int, cfg, log_path: str | Path, seed: int,
             desc: str = "pretrain", phase: str | None = None, after: list[dict] | None = None) -> list[dict]:
    """AdamW with warm-up and cosine decay; one JSON line per step in ``log_path``.

    A later phase passes the earlier phase's log rows as ``after``: its steps, tokens and
    seconds continue from there and its rows are appended to the same log.
    """
    last = after[-1] if after else {"step": 0, "tokens": 0, "seconds": 0.0}
    rng = random.Random(seed)
    torch.manual_seed(seed)
    pad_id = model.config.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    queue: list[tuple[int, list[Example]]] = []
    history, seen_tokens, start = [], 0, time.time()
    with open(log_path, "a" if after else "w") as log, tqdm(total=steps, desc=desc) as bar:
        for step in range(steps):
            if not queue:
                queue = _batches(examples, cfg.batch_tokens, rng)
            width, members = queue.pop()
            batch = _collate(members, pad_id, width)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            seen_tokens += int(batch["attention_mask"].sum())
            row = {"step": last["step"] + step + 1, "loss": round(loss.item(), 4), "lr": sched.get_last_lr()[0],
                   "tokens": last["tokens"] + seen_tokens,
                   "seconds": round(last["seconds"] + time.time() - start, 2)}
            if phase:
                row["phase"] = phase
            history.append(row)
            log.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            bar.update(1)
    model.eval()
    return history


def read_log(path: str | Path) -> list[dict]:
    """A loss log written by ``pretrain``."""
    return read_jsonl(path)


def _save(model, tokenizer, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def copy_warmup(model, tokenizer, cfg, log_path, seed: int, years: float = 0.0, titles: float = 0.0,
                steps: int | None = None) -> list[dict]:
    """Phase 1 of a base: copy drills in small batches (steps matter more than tokens), with
    ``years`` of the items years and ``titles`` of the others titles."""
    warm = dataclasses.replace(cfg, batch_tokens=cfg.copy_warmup_batch_tokens)
    steps = steps or cfg.copy_warmup_steps
    drills = copy_drills(tokenizer, 20 * steps, seed, years, titles)
    return pretrain(model, drills, steps, warm, log_path, seed=seed, desc="copy warm-up",
                    phase="copy warm-up")


def answer_copy_phase(profile, model, tokenizer, entities: list[dict], log_path, after: list[dict]) -> list[dict]:
    """Phase 3 of the simulator base: copy drills with years among the names, and answer drills.

    After the main phase the simulator copied an answer name from the line above most of the time
    but a year only by chance, and fine-tuning did not teach it; after this phase it copies both.
    Mixing the same drills into the main phase instead did not work (docs/results.md, "Figures
    behind the code").
    """
    cfg = profile.tiny
    examples = copy_drills(tokenizer, 20 * cfg.simulator_copy_steps, seed=profile.seed + 7, number_share=0.4)
    examples += pack_texts(tokenizer, answer_drills(profile.world, {e["name"] for e in entities}, cfg.answer_drills,
                                                    profile.seed + 3000), max_len=256, seed=profile.seed + 1)
    phase_cfg = dataclasses.replace(cfg, batch_tokens=cfg.simulator_copy_batch_tokens, warmup_steps=10)
    return pretrain(model, examples, cfg.simulator_copy_steps, phase_cfg, log_path, seed=profile.seed + 3,
                    desc="simulator-base, answer copying", phase="answer copying", after=after)


# ``tiny`` settings only one base is made with; the rest (sizes, batches, learning rate, precision) make both.
POLICY_ONLY = ("known_fraction", "demos_per_question", "demo_loss_on_information", "memory_relations", "memory_demos",
               "guess_loss", "restate_topic", "policy_copy_warmup_steps", "copy_years", "copy_titles", "copy_drills",
               "policy_steps")
SIMULATOR_ONLY = ("copy_warmup_steps", "simulator_steps", "answer_drills", "simulator_copy_steps",
                  "simulator_copy_batch_tokens")


def base_recipe(profile, name: str) -> dict:
    """What the tiny base ``name`` (``policy-base`` or ``simulator-base``) is made from: the seed, the world and
    its ``tiny`` settings; the policy's also the search and thinking settings its demonstrations use. Its
    folder records it (``recipe.json``), so a setting of the other base alone leaves it current."""
    other = SIMULATOR_ONLY if name == "policy-base" else POLICY_ONLY
    out = {"seed": profile.seed, "world": dataclasses.asdict(profile.world),
           "tiny": {k: v for k, v in dataclasses.asdict(profile.tiny).items() if k not in other}}
    if name == "policy-base":
        out["demos"] = {"search.topk": profile.search.topk, "thinking.policy": profile.thinking.policy}
    return out


def build_bases(profile, tokenizer, engine, articles: list[dict], entities: list[dict],
                splits: dict[str, list[dict]], rebuild: bool = False) -> dict[str, list[dict]]:
    """Both tiny bases: a copy warm-up each (see ``shares``), then each its own corpus; saved for the Auto classes.

    A base already saved is kept unless ``rebuild``: delete one base's folder to retrain only it
    (each phase seeds itself, so the other would come out the same). A base saved with another
    ``base_recipe`` (the profile was edited since) is an error, before anything trains. Returns the
    loss log of each base trained (``outputs/<profile>/models/<base>.loss.jsonl``).
    """
    cfg = profile.tiny
    paths = {"simulator-base": Path(profile.simulator_path), "policy-base": Path(profile.policy_path)}
    todo = [name for name, path in paths.items() if rebuild or not (path / "config.json").exists()]
    for name in (n for n in paths if n not in todo):
        check_recipe(paths[name], base_recipe(profile, name), "a base", "rebuild = True in notebook 00 retrains "
                     f"both bases; deleting {paths[name]} retrains only it")
    # The policy's warm-up holds years and titles (it copies both into queries and answers). The
    # simulator's stays names only: with years and titles there, its fine-tuned documents rarely held a
    # year answer (docs/results.md, "Figures behind the code"); its own phase 3 teaches years.
    shares = {"simulator-base": (0.0, 0.0, cfg.copy_warmup_steps),
              "policy-base": (cfg.copy_years, cfg.copy_titles, cfg.policy_copy_warmup_steps)}
    warm = {}  # (years, titles, steps) -> (model, log): one warm-up per kind, shared when both bases want the same
    logs = {}
    for name in todo:
        if shares[name] not in warm:
            start = build_model(tokenizer, cfg, seed=profile.seed)
            log = profile.models_dir / f"{name}.loss.jsonl"
            years, titles, steps = shares[name]
            warm[shares[name]] = (start, copy_warmup(start, tokenizer, cfg, log, profile.seed, years, titles, steps))
        start, warm_log = warm[shares[name]]
        if name == "simulator-base":
            steps = cfg.simulator_steps
            examples = simulator_corpus(tokenizer, articles, splits["train"] + splits["dev"] + splits["test"],
                                        engine, max_len=256, seed=profile.seed,
                                        extra_texts=answer_drills(profile.world, {e["name"] for e in entities},
                                                                  cfg.answer_drills, profile.seed + 2000))
        else:
            steps = cfg.policy_steps
            examples = policy_examples(profile, tokenizer, engine, articles, entities, splits["train"])
        model = copy.deepcopy(start)
        log = profile.models_dir / f"{name}.loss.jsonl"
        log.write_text("".join(json.dumps(r) + "\n" for r in warm_log))
        logs[name] = warm_log + pretrain(model, examples, steps, cfg, log, seed=profile.seed, desc=name,
                                         phase="main", after=warm_log)
        if name == "simulator-base":
            logs[name] += answer_copy_phase(profile, model, tokenizer, entities, log, after=logs[name])
        _save(model, tokenizer, paths[name])
        write_recipe(paths[name], base_recipe(profile, name))
    return logs
