"""The search simulator (docs/method.md §5): LoRA fine-tuning with TRL, a search engine built on it, and
its evaluation against the prompt-only base and the real engine.

``SimulatedEngine.search(queries, topk, noisy=..., questions=..., answers=...)`` has the same
shape as every other engine's ``search``; the extra lists say, per call, whether to write useful
or noisy documents and for which question and gold answer.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from pathlib import Path

import torch

from .curriculum import draw_noisy
from .files import RECIPE, check_recipe, write_recipe
from .generation.models import check_special_tokens, load_tokenizer, quiet_loading
from .http_client import post_json
from .progress import tqdm
from .prompts import render_simulator_prompt, simulator_user_message
from .registry import Registry
from .reward import normalize_answer
from .search import Doc

# "Doc 3(Title: X) text" up to the next "Doc n(" or the end. Lenient about spaces and quotes;
# a title may hold one level of parentheses, as Wikipedia's "Mercury (planet)".
_DOC = re.compile(r"Doc\s*(\d+)\s*\(\s*Title:\s*((?:[^()\n]|\([^()\n]*\))*)\)\s*(.*?)(?=Doc\s*\d+\s*\(|\Z)",
                  re.DOTALL)


def parse_docs(text: str, k: int) -> tuple[list[Doc], bool]:
    """Documents from simulator output, cut after the k-th, and whether the output was well formed
    (at least k numbered documents). Never raises: text without numbering becomes one document
    per non-empty line, so a malformed answer still gives the policy something to read."""
    found = [Doc(t.strip().strip('"'), " ".join(body.split())) for _, t, body in _DOC.findall(text)]
    if found:
        return found[:k], len(found) >= k
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return [Doc("", line) for line in lines[:k]], False


def contains_answer(docs: list[Doc], answers: list[str]) -> bool:
    """Whether any document states any gold answer (normalised substring, as cover-EM)."""
    text = " " + normalize_answer(" ".join(f"{d.title} {d.text}" for d in docs)) + " "
    return any(f" {normalize_answer(a)} " in text for a in answers if normalize_answer(a))


class InProcessTransport:
    """The simulator generating in this process, on the profile's generation backend, ``batch_calls``
    prompts per generate call. ``model``: a transformers model, or for a backend that loads checkpoints
    itself (``backends.FROM_FOLDER``) the checkpoint's folder, served in ``dtype``."""

    def __init__(self, model, tokenizer, backend: str = "hf", vllm_cfg=None, batch_calls: int = 32,
                 dtype: str | None = None):
        self.model, self.tokenizer, self.backend_kind, self.vllm_cfg = model, tokenizer, backend, vllm_cfg
        self.batch_calls, self.dtype = batch_calls, dtype
        self._backends: dict = {}

    @property
    def generated_tokens(self) -> int:
        return sum(b.generated_tokens for b in self._backends.values())

    def complete(self, prompts: list[list[int]], k: int, max_new_tokens: int, temperature: float,
                 top_p: float) -> list[str]:
        if k not in self._backends:
            # Stop as soon as document k+1 begins: the simulator pays only for what the policy reads.
            from .generation.backends import make_backend
            options = {"dtype": self.dtype} if isinstance(self.model, (str, Path)) else {}
            self._backends[k] = make_backend(self.backend_kind, self.model, self.tokenizer, [f"Doc {k + 1}("],
                                             self.vllm_cfg, reuse_cache=False, **options)
        texts = []
        for i in range(0, len(prompts), self.batch_calls):
            out = self._backends[k].generate(prompts[i:i + self.batch_calls], max_new_tokens, temperature, top_p)
            texts += [self.tokenizer.decode(o, skip_special_tokens=True) for o in out]
        return texts


class SimulatorServerError(RuntimeError):
    pass


class HTTPTransport:
    """The simulator behind OpenAI-compatible completions endpoints (vLLM's server, started by
    ``python -m zslib.serve_simulator``): one URL or several, taking the request chunks in turn.
    Prompts go as token ids, so the server sees exactly what the in-process simulator would;
    ``threads`` requests of ``batch_calls`` prompts are in flight at once. A timeout, a dropped
    connection or a 5xx answer is tried again ``retries`` times (on the same server) with doubling
    pauses; then, or at once for a 4xx answer, the error names that server's URL. A server that is
    down is an error, not a reason to send its share elsewhere: a missing server should be noticed."""

    def __init__(self, url: str | list[str], model_name: str, timeout_s: float = 60.0, retries: int = 3,
                 threads: int = 4, batch_calls: int = 32, backoff_s: float = 0.5):
        self.urls = [u.rstrip("/") for u in ([url] if isinstance(url, str) else url)]
        if not self.urls:
            raise ValueError("HTTPTransport needs at least one URL")
        self.url, self.model_name = self.urls[0], model_name
        self.timeout_s, self.retries, self.threads, self.batch_calls = timeout_s, retries, threads, batch_calls
        self.backoff_s = backoff_s
        self.generated_tokens = 0
        self._turn = 0  # the server the next chunk goes to: the round robin goes on across calls
        self._count = threading.Lock()  # replies arrive on several threads

    def _post(self, body: dict, url: str | None = None) -> dict:
        return post_json(f"{url or self.url}/completions", body, server="simulator server", error=SimulatorServerError,
                         hint="Start it with `python -m zslib.serve_simulator --profile <profile>`, or set "
                              "simulator.serve: inprocess", timeout_s=self.timeout_s, retries=self.retries,
                         backoff_s=self.backoff_s)

    def complete(self, prompts: list[list[int]], k: int, max_new_tokens: int, temperature: float,
                 top_p: float) -> list[str]:
        from concurrent.futures import ThreadPoolExecutor
        chunks = [prompts[i:i + self.batch_calls] for i in range(0, len(prompts), self.batch_calls)]
        servers = [self.urls[(self._turn + i) % len(self.urls)] for i in range(len(chunks))]
        self._turn = (self._turn + len(chunks)) % len(self.urls)

        def ask(chunk: list[list[int]], url: str) -> list[str]:
            reply = self._post({"model": self.model_name, "prompt": chunk, "max_tokens": max_new_tokens,
                                "temperature": temperature, "top_p": top_p, "stop": [f"Doc {k + 1}("],
                                "include_stop_str_in_output": True}, url)
            choices = sorted(reply.get("choices", []), key=lambda c: c["index"])
            if len(choices) != len(chunk):
                raise SimulatorServerError(f"simulator server {url}/completions answered {len(choices)} "
                                           f"completions for {len(chunk)} prompts")
            with self._count:
                self.generated_tokens += reply.get("usage", {}).get("completion_tokens", 0)
            return [c["text"] for c in choices]

        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            return [text for texts in pool.map(ask, chunks, servers) for text in texts]


class SimulatedEngine:
    """An LLM that writes search results on demand, useful or noisy per call, through a transport
    (in this process, or a server over HTTP: ``simulator.serve``).

    ``generated_tokens`` and ``calls`` count the cost (what a real API would have billed).
    """

    def __init__(self, transport, tokenizer, cfg, variant: str | None = None, thinking: bool = False):
        self.transport, self.tokenizer, self.cfg = transport, tokenizer, cfg
        self.variant = variant or cfg.prompt
        self.thinking = thinking  # thinking.simulator, as the SFT rows were rendered
        self.calls = 0

    @property
    def generated_tokens(self) -> int:
        return self.transport.generated_tokens

    def prompts(self, queries, topk, noisy, questions, answers) -> list[str]:
        return [render_simulator_prompt(self.tokenizer, simulator_user_message(
                    q, question, answer, useful=not bad, k=topk, words=self.cfg.words_per_doc, variant=self.variant),
                    self.thinking)
                for q, bad, question, answer in zip(queries, noisy, questions, answers)]

    def generate_raw(self, queries, topk, noisy, questions, answers, temperature=None) -> list[str]:
        """The simulator's raw text per call (before parsing)."""
        temperature = self.cfg.temperature if temperature is None else temperature
        prompts = [self.tokenizer(p, add_special_tokens=False)["input_ids"]
                   for p in self.prompts(queries, topk, noisy, questions, answers)]
        texts = self.transport.complete(prompts, topk, self.cfg.max_new_tokens, temperature, self.cfg.top_p)
        self.calls += len(prompts)
        return texts

    def search(self, queries: list[str], topk: int, noisy: list[bool] | None = None,
               questions: list[str] | None = None, answers: list[str] | None = None,
               temperature: float | None = None) -> list[list[Doc]]:
        n = len(queries)
        noisy = noisy if noisy is not None else [False] * n
        questions = questions if questions is not None else list(queries)
        answers = answers if answers is not None else [""] * n
        if not len(noisy) == len(questions) == len(answers) == n:
            raise ValueError(f"search: {n} queries but {len(noisy)} noisy flags, {len(questions)} questions, "
                             f"{len(answers)} answers")
        raw = self.generate_raw(queries, topk, noisy, questions, answers, temperature)
        return [parse_docs(text, topk)[0] for text in raw]


def _http_transport(profile, finetuned: bool, loaded, device):
    """(transport, tokenizer) for the simulator server at ``simulator.url``."""
    cfg = profile.simulator
    tokenizer = loaded[1] if loaded else load_tokenizer(str(profile.simulator_dir if finetuned else profile.simulator_path))
    name = cfg.served_name if finetuned else f"{cfg.served_name}-base"
    return HTTPTransport(cfg.urls, name, cfg.timeout_s, cfg.retries, cfg.threads, cfg.batch_calls), tokenizer


def _inprocess_transport(profile, finetuned: bool, loaded, device):
    """(transport, tokenizer) for the simulator generating in this process, on ``rollout.backend`` with
    the simulator's engine settings (``simulator_vllm``). A backend that loads checkpoints itself
    (vLLM) gets the checkpoint's folder, so no transformers copy of the simulator stays in memory."""
    from .generation.backends import FROM_FOLDER
    kind, dtype = profile.rollout.backend, None
    if loaded:
        model, tokenizer = loaded
    elif kind in FROM_FOLDER:
        dtype = simulator_dtype(profile, device)
        model = simulator_checkpoint(profile, finetuned, dtype)
        tokenizer = load_tokenizer(str(profile.simulator_dir if finetuned else profile.simulator_path))
    else:
        model, tokenizer = load_simulator(profile, finetuned=finetuned, device=device)
    transport = InProcessTransport(model, tokenizer, kind, profile.simulator_vllm_config, profile.simulator.batch_calls,
                                   dtype)
    return transport, tokenizer


# ``simulator.serve``: (profile, fine-tuned or base, a loaded (model, tokenizer) or None, device) -> (transport, tokenizer).
TRANSPORTS = Registry("simulator.serve", {"inprocess": _inprocess_transport, "http": _http_transport})


def engine_for(profile, finetuned: bool = True, variant: str | None = None, loaded=None, device: str | None = None,
               serve: str | None = None):
    """The profile's simulator as a search engine, the one way to build one: the fine-tuned simulator
    (or the base, ``finetuned=False``) through the transport ``simulator.serve`` names (or ``serve``):
    in this process on the profile's generation backend, or the server at ``simulator.url``.
    ``loaded``: a ``(model, tokenizer)`` already in memory (its tokenizer only, over HTTP)."""
    transport, tokenizer = TRANSPORTS[serve or profile.simulator.serve](profile, finetuned, loaded, device)
    return SimulatedEngine(transport, tokenizer, profile.simulator, variant=variant, thinking=profile.thinking.simulator)


def hop_answer(query: str, golden: str, hop_answers: list[str]) -> str:
    """The answer useful documents for ``query`` should state. A multi-hop question's hop ``i``
    asks about hop ``i-1``'s answer, so the query's hop is the last one whose previous answer it
    names (the first hop when it names none); without ``hop_answers``, the gold answer."""
    if len(hop_answers) < 2:
        return golden
    text = f" {normalize_answer(query)} "
    hop = max([i for i in range(1, len(hop_answers)) if f" {normalize_answer(hop_answers[i - 1])} " in text],
              default=0)
    return hop_answers[hop]


def simulator_search_fn(engine: SimulatedEngine, topk: int, noise_probability: float, rng: torch.Generator,
                        hop_hints: bool = False):
    """The rollout hook for RL: one independent noisy draw per search call (docs/method.md §7).
    ``hop_hints``: the simulator is told each query's hop answer (``hop_answer``), not the final one."""
    def search_fn(queries, trajs):
        noisy = draw_noisy(len(queries), noise_probability, rng)
        answers = [hop_answer(q, t.golden_answers[0], t.hop_answers) if hop_hints else t.golden_answers[0]
                   for q, t in zip(queries, trajs)]
        docs = engine.search(queries, topk, noisy=noisy, questions=[t.question for t in trajs], answers=answers)
        return docs, noisy
    return search_fn


# ---------------------------------------------------------------- fine-tuning (TRL + peft)

def train_simulator(profile, sft_rows: list[dict], out_dir: str | Path | None = None) -> dict:
    """Fine-tune the simulator base on prompt/completion rows with TRL's ``SFTTrainer``.

    Loss is on the completion only (the documents). With ``simulator.lora`` the LoRA adapter is
    saved, otherwise the full weights; both load with ``load_simulator``. Returns the log history
    (also written to ``<out_dir>/sft.loss.jsonl`` for the plots), the trainable parameter count and
    the tokens the steps processed, padding included.
    """
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    cfg = profile.simulator
    out_dir = Path(out_dir or profile.simulator_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    on_gpu = torch.cuda.is_available()
    quiet_loading()
    tokenizer = load_tokenizer(profile.simulator_path)
    model = AutoModelForCausalLM.from_pretrained(
        profile.simulator_path, dtype=torch.float32)  # master weights; bf16 comes from autocast
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in sft_rows])
    args = SFTConfig(
        output_dir=str(out_dir / "trainer"), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps, max_length=cfg.max_length, completion_only_loss=True,
        lr_scheduler_type="cosine", warmup_steps=0.03, logging_steps=10, save_strategy="no", report_to=[],
        use_cpu=not on_gpu, bf16=cfg.bf16, gradient_checkpointing=cfg.gradient_checkpointing,
        pad_to_multiple_of=8, seed=profile.seed, dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        include_num_input_tokens_seen="all")  # padded tokens: what the steps cost
    peft_config = None
    if cfg.lora:
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_targets),
                                 lora_dropout=0.0, task_type="CAUSAL_LM",
                                 modules_to_save=["lm_head"] if cfg.train_lm_head else None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config)
    trainer.train()
    trainer.save_model(str(out_dir))  # the adapter with LoRA, the whole model without
    tokenizer.save_pretrained(str(out_dir))
    history = [r for r in trainer.state.log_history if "loss" in r]
    (out_dir / "sft.loss.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    return {"history": history, "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "padded_tokens": trainer.state.num_input_tokens_seen}


# The simulator settings that shape its fine-tuned weights (the rest are decoding and serving, or memory for time).
SFT_SETTINGS = ("lora", "lora_r", "lora_alpha", "lora_targets", "train_lm_head", "lr", "epochs", "max_steps",
                "batch_size", "grad_accum", "max_length", "bf16", "group_by_length")


def sft_recipe(profile, sft_rows: list[dict]) -> dict:
    """What a fine-tuned simulator is made from: the seed, its base (and the base's own recipe, where it
    records one), ``SFT_SETTINGS``, and a digest of the SFT rows (so new labels from notebook 02 count)."""
    base = Path(profile.simulator_path) / RECIPE
    rows = hashlib.sha256(json.dumps(sft_rows, sort_keys=True).encode()).hexdigest()
    return {"seed": profile.seed, "base": {"models.simulator": profile.models.simulator,
                                           "recipe": json.loads(base.read_text()) if base.exists() else None},
            "simulator": {k: getattr(profile.simulator, k) for k in SFT_SETTINGS}, "sft_rows": rows}


def fine_tune(profile, sft_rows: list[dict], retrain: bool = False) -> dict | None:
    """``train_simulator`` into ``outputs/<profile>/simulator/``, unless it holds a fine-tuned simulator already
    and not ``retrain``: then it is kept (None is returned), and refused when its ``sft_recipe`` differs from
    the profile's (an error naming each setting, before anything trains)."""
    folder = Path(profile.simulator_dir)
    recipe = sft_recipe(profile, sft_rows)
    if not retrain and any((folder / f).exists() for f in ("adapter_config.json", "config.json")):
        check_recipe(folder, recipe, "a fine-tuned simulator", "retrain = True in notebook 03 fine-tunes it again")
        return None
    (folder / RECIPE).unlink(missing_ok=True)  # an interrupted run leaves no recipe beside half its weights
    result = train_simulator(profile, sft_rows, folder)
    write_recipe(folder, recipe)
    return result


def simulator_dtype(profile, device: str | None = None) -> str:
    """The simulator's inference dtype: ``models.dtype`` on a GPU, fp32 on a CPU."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return profile.models.dtype if device == "cuda" else "float32"


def simulator_checkpoint(profile, finetuned: bool = True, dtype: str = "float32", path: str | Path | None = None) -> str:
    """The checkpoint an engine that loads its own weights serves as the simulator: the base
    (``models.simulator``), the fine-tuned full model's folder (``path``, default
    ``outputs/<profile>/simulator/``), or, for a LoRA adapter, the base with the adapter merged in,
    written once beside the adapter (``merged-<digest>/``, remade when the adapter, base or dtype change)."""
    source = Path(path or profile.simulator_dir)
    if not finetuned:
        return profile.simulator_path
    if (source / "adapter_config.json").exists():
        return str(_merged_adapter(profile, source, dtype))
    if (source / "config.json").exists():
        return str(source)
    raise FileNotFoundError(f"no fine-tuned simulator in {source}: run notebook 03 first")


def _merged_adapter(profile, source: Path, dtype: str) -> Path:
    import gc
    import hashlib
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    digest = hashlib.sha256(json.dumps([profile.simulator_path, dtype]).encode())
    for f in sorted(source.glob("adapter_*")):
        digest.update(f.name.encode() + f.read_bytes())
    folder = source / f"merged-{digest.hexdigest()[:12]}"
    if (folder / "config.json").exists():
        return folder
    quiet_loading()
    # Merged in fp32 on the CPU (exact, and no GPU memory), stored in the dtype it is served in.
    base = AutoModelForCausalLM.from_pretrained(profile.simulator_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(source)).merge_and_unload().to(getattr(torch, dtype))
    partial = source / f".{folder.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(str(partial))
    load_tokenizer(str(source)).save_pretrained(str(partial))  # its end of sequence checked, as in process
    del model, base
    gc.collect()
    for old in source.glob("merged-*"):  # an earlier adapter's
        shutil.rmtree(old, ignore_errors=True)
    partial.rename(folder)
    return folder


def load_simulator(profile, finetuned: bool = True, device: str | None = None, path: str | Path | None = None):
    """``(model, tokenizer)``: the fine-tuned simulator (adapter merged for speed) from ``path``
    (default ``outputs/<profile>/simulator/``), or its base."""
    from transformers import AutoModelForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, simulator_dtype(profile, device))
    source = Path(path or profile.simulator_dir)
    if not finetuned:
        source = profile.simulator_path  # a local folder or a hub id
    elif not any((source / f).exists() for f in ("adapter_config.json", "config.json")):
        raise FileNotFoundError(f"no fine-tuned simulator in {source}: run notebook 03 first")
    quiet_loading()
    tokenizer = load_tokenizer(str(source))
    if finetuned and (source / "adapter_config.json").exists():
        from peft import PeftModel
        base = AutoModelForCausalLM.from_pretrained(profile.simulator_path, dtype=dtype)
        model = PeftModel.from_pretrained(base, str(source)).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
    check_special_tokens(tokenizer, model, str(source))
    return model.to(device).eval(), tokenizer


# ---------------------------------------------------------------- evaluation

def evaluate_engine(search, triples: list[dict], topk: int, desc: str = "simulator") -> dict:
    """Share of useful calls whose documents hold the gold answer, the same for noisy calls, and
    the share of outputs that parse into k documents.

    ``search(queries, noisy, questions, answers) -> (docs per call, well-formed per call)``.
    """
    stats = {}
    for noisy in (False, True):
        hits = parsed = 0
        for i in tqdm(range(0, len(triples), 64), desc=f"{desc} ({'noisy' if noisy else 'useful'})"):
            chunk = triples[i:i + 64]
            docs, ok = search([t["query"] for t in chunk], [noisy] * len(chunk),
                              [t["question"] for t in chunk], [t["golden_answers"][0] for t in chunk])
            hits += sum(contains_answer(d, t["golden_answers"]) for d, t in zip(docs, chunk))
            parsed += sum(ok)
        stats["noisy" if noisy else "useful"] = (hits / max(1, len(triples)), parsed / max(1, len(triples)))
    return {"useful_contains_answer": stats["useful"][0], "noisy_contains_answer": stats["noisy"][0],
            "parse_rate": (stats["useful"][1] + stats["noisy"][1]) / 2, "n": len(triples)}


def simulator_eval_fn(engine: SimulatedEngine, topk: int, temperature: float):
    def search(queries, noisy, questions, answers):
        raw = engine.generate_raw(queries, topk, noisy, questions, answers, temperature)
        parsed = [parse_docs(text, topk) for text in raw]
        return [p[0] for p in parsed], [p[1] for p in parsed]
    return search


def real_engine_eval_fn(engine, topk: int):
    """A real engine has no noisy mode: both kinds of call get its ordinary results."""
    def search(queries, noisy, questions, answers):
        docs = engine.search(queries, topk)
        return docs, [len(d) >= topk for d in docs]
    return search
