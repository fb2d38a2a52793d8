"""Notebook 00 for a real pretrained model: from a packaged GGUF file to a policy base that follows
the search protocol (the ``warmup`` section of a profile; ``configs/smollm2.yaml``).

A pretrained instruct model knows nothing of ``<search>`` and ``<information>``: SmolLM2-135M-Instruct,
given the policy prompt, answered in prose on every question (DESIGN §13), so RL from it gets no
reward. A short supervised warm-up on the tiny world's scripted demonstrations teaches the format and
the habit of searching. The demonstrations keep their mistakes (poor queries, wrong picks, guesses),
but a real model soon copies answers from retrieved articles without them (docs/results.md, issue 25);
``warmup.memory_relations`` adds a flaw that only searching fixes, as the tiny base has.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import torch

from .files import check_recipe, write_folder_atomic, write_recipe
from .generation.models import convert_gguf, load_causal_lm
from .generation.packaged import PACKAGED, packaged_path


def prepare_packaged(profile) -> list[str]:
    """Convert every packaged model the profile names (``models.policy``, ``models.simulator``) into
    ``outputs/<profile>/models/<name>`` once; returns a line per model saying what was done."""
    lines = []
    for name in dict.fromkeys((profile.models.policy, profile.models.simulator)):
        if name not in PACKAGED:
            continue
        folder = Path(profile.model_source(name))
        if (folder / "config.json").exists():
            lines.append(f"{name}: converted before, in {folder}")
            continue
        _, notes = convert_gguf(packaged_path(name), folder)
        lines += [f"{name}: converted from its GGUF file into {folder}"] + [f"  {n}" for n in notes]
    return lines


def warmup_demos(profile, tokenizer, engine, splits: dict, entities: list[dict]):
    """The warm-up's demonstrations: ``warmup.questions`` train questions (1-hop and 2-hop), one
    scripted demonstration each, rendered with ``tokenizer``'s chat template, plus ``warmup.memory_demos``
    answers without a search for each question about ``warmup.memory_relations``."""
    from .tiny import recipes

    rows = random.Random(profile.seed).sample(splits["train"], min(profile.warmup.questions, len(splits["train"])))
    by_name = {e["name"]: e for e in entities}
    cfg = profile.warmup
    return recipes.scripted_demos(tokenizer, rows, engine, by_name, known=set(), topk=profile.search.topk,
                                  seed=profile.seed, per_question=1, restate_topic=True,
                                  memory_relations=cfg.memory_relations, memory_demos=cfg.memory_demos, guess_loss=False,
                                  enable_thinking=profile.thinking.policy)


def warmup_recipe(profile) -> dict:
    """What the warmed-up policy base is made from: the seed, its source (``models.policy``), the ``warmup``
    settings, and the search and thinking settings its demonstrations use."""
    return {"seed": profile.seed, "models.policy": profile.models.policy, "warmup": dataclasses.asdict(profile.warmup),
            "demos": {"search.topk": profile.search.topk, "thinking.policy": profile.thinking.policy}}


def protocol_warmup(profile, engine, splits: dict, entities: list[dict], rebuild: bool = False) -> dict:
    """Train the policy base from ``models.policy`` on ``warmup_demos`` and save it to
    ``profile.policy_path`` (atomically; a LoRA adapter is merged first). Kept when it exists, unless
    ``rebuild``; one saved with another ``warmup_recipe`` is an error, before anything loads. Returns
    {"history": loss rows, "demos": count, "trained": parameters trained}."""
    from .tiny import pretraining

    cfg, out = profile.warmup, Path(profile.policy_path)
    log = profile.models_dir / "policy-base.loss.jsonl"
    recipe = warmup_recipe(profile)
    if (out / "config.json").exists() and not rebuild:
        check_recipe(out, recipe, "a warmed-up policy base", "rebuild = True in notebook 00 trains it again")
        return {"history": pretraining.read_log(log), "demos": None, "trained": None}
    model, tokenizer = load_causal_lm(profile.model_source(profile.models.policy), "float32", "cpu")
    demos = warmup_demos(profile, tokenizer, engine, splits, entities)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model
        torch.manual_seed(profile.seed)  # the adapter's initial weights
        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    history = pretraining.pretrain(model, demos, cfg.steps, cfg, log, seed=profile.seed, desc="protocol warm-up")
    if cfg.lora:
        model = model.merge_and_unload()

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        write_recipe(folder, recipe)

    write_folder_atomic(out, write)
    return {"history": history, "demos": len(demos), "trained": trained}
