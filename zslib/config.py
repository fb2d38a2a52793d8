"""Profiles: one dataclass tree, loaded from ``configs/<name>.yaml``, shared by every notebook.

``load_profile("tiny", overrides={"tiny.policy_steps": 50})`` returns a ``Profile``. Everything is
checked when the profile loads, before any notebook runs, and a problem is a ``ConfigError`` naming
the dotted key, the value and what is allowed:

- unknown keys and values of the wrong type;
- a name that is not in its registry: ``rl.algorithm`` in ``algos.ALGORITHMS``, ``rl.reward`` in
  ``reward.REWARDS``, and so on (the ``choice`` fields below say which), so a typo never waits for
  the first loss after a full rollout;
- a value out of range (``number`` fields: a group of 0 rollouts, a negative learning rate, a
  probability outside [0, 1]) and settings that contradict each other (``Profile.__post_init__``).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import algos, curriculum, labeling, prompts, reward, search, simulator
from .checks import validate_ranges
from .files import ROOT
from .generation import backends
from .generation.packaged import PACKAGED
from .tiny.world import RELATIONS, WorldConfig

CONFIG_DIR = ROOT / "configs"


class ConfigError(ValueError):
    pass


# ---------------------------------------------------------------- what a field allows

def choice(default, names):
    """A field whose value (or, for a list, each item) must be a key of ``names``: a registry
    (``algos.ALGORITHMS``) or a tuple of names."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"choices": names})
    return field(default=default, metadata={"choices": names})


def number(default, low=None, high=None, above=None, below=None):
    """A numeric field in a range: ``low``/``high`` inclusive, ``above``/``below`` exclusive."""
    return field(default=default, metadata={"range": (low, high, above, below)})


def _range_text(low, high, above, below) -> str:
    """``>= 1``, ``> 0``, ``in [0, 1]``, ``in (0, 1]``: what a range allows, as the messages say it."""
    if (low is not None or above is not None) and (high is not None or below is not None):
        left = f"[{low:g}" if low is not None else f"({above:g}"
        right = f"{high:g}]" if high is not None else f"{below:g})"
        return f"in {left}, {right}"
    if low is not None or above is not None:
        return f">= {low:g}" if low is not None else f"> {above:g}"
    return f"<= {high:g}" if high is not None else f"< {below:g}"


def check_field(key: str, value, metadata) -> None:
    """Raise ConfigError when ``value`` is not what the field's metadata allows."""
    names = metadata.get("choices")
    if names is not None:
        for item in value if isinstance(value, list) else [value]:
            if item not in names:
                raise ConfigError(f"{key} must be one of {', '.join(map(str, names))}, not {item!r}")
    bounds = metadata.get("range")
    if bounds is not None and value is not None:
        low, high, above, below = bounds
        if ((low is not None and value < low) or (high is not None and value > high)
                or (above is not None and value <= above) or (below is not None and value >= below)):
            raise ConfigError(f"{key} must be {_range_text(*bounds)}, not {value!r}")


class _Section:
    """A profile section: its fields are checked against their metadata when it is built
    (``KEY`` is the section's name in the YAML, for the messages)."""
    KEY = ""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check_field(f"{self.KEY}.{f.name}", getattr(self, f.name), f.metadata)


def bf16_setting(value, key: str, device: str | None = None) -> bool:
    """A bf16-autocast switch: ``true`` or ``false`` as given; ``auto``: on where bf16 is fast on
    ``device`` (default: the GPU if there is one, else the CPU), off elsewhere (``models.fast_bf16``)."""
    if isinstance(value, bool):
        return value
    if value != "auto":
        raise ConfigError(f"{key} must be true, false or auto, not {value!r}")
    from .generation.models import default_device, fast_bf16
    return fast_bf16(device or default_device())[0]


PROBABILITY = {"low": 0.0, "high": 1.0}
DTYPES = ("float32", "bfloat16", "float16")


# ---------------------------------------------------------------- the sections

@dataclass
class DataConfig(_Section):
    KEY = "data"
    train_sets: list = field(default_factory=lambda: ["tiny"])  # "tiny" or FlashRAG names
    eval_sets: list = field(default_factory=lambda: ["tiny"])
    local_dir: str | None = None  # folder with <name>/<split>.jsonl|parquet, used before the hub
    eval_size: int = number(300, low=1)  # held-out questions per evaluation set


@dataclass
class SearchConfig(_Section):
    KEY = "search"
    engine: str = choice("bm25", search.ENGINES)  # bm25 | web | retriever | none
    topk: int = number(3, low=1)
    corpus_path: str | None = None       # None: the tiny world's corpus
    threads: int = number(0, low=0)      # bm25: threads scoring a batch of queries; 0: one per core
    web_url: str = "https://google.serper.dev/search"
    web_provider: str = choice("serper", search.WEB_PROVIDERS)
    web_api_key_env: str = "SERPER_API_KEY"
    web_cache_dir: str | None = None
    # engine: retriever, a server speaking Search-R1's protocol (POST {"queries", "topk", "return_scores"})
    url: str = "http://127.0.0.1:8000/retrieve"
    timeout_s: float = number(30.0, above=0)  # per request
    retries: int = number(3, low=0)  # further tries after a timeout, a dropped connection or a 5xx answer


@dataclass
class ModelsConfig(_Section):
    KEY = "models"
    # "tiny": built by notebook 00; a packaged model (generation/packaged.py: smollm2-135m-instruct),
    # converted by notebook 00 into outputs/<profile>/models/<name>; else a hub id or a local path
    policy: str = "tiny"
    simulator: str = "tiny"
    dtype: str = choice("float32", DTYPES)


@dataclass
class ThinkingConfig(_Section):
    """Qwen3's chat template thinks before it answers unless told not to (``enable_thinking``): on or
    off for each step's prompts. Templates without the switch (the tiny models, SmolLM2) ignore it.
    Thinking spends a turn's token budget (``rollout.max_tokens_per_turn``); the turns that used all
    of it without an action are counted (``hit_limit``) where the step reports."""
    KEY = "thinking"
    policy: bool = True      # the protocol reasons inside <think>, Qwen3's own thinking tags
    collector: bool = True   # the collector runs the same protocol
    simulator: bool = False  # the simulator writes documents, not reasoning
    judge: bool = False      # labeling.judge: llm answers yes or no
    direct: bool = False     # notebook 05's baselines answer in one short turn
    rag: bool = False


@dataclass
class WarmupConfig(_Section):
    """Notebook 00's protocol warm-up, for a pretrained model that does not follow the search protocol
    from its prompt alone (SmolLM2-135M-Instruct wrote no valid action on 32 of 32 questions): a short
    supervised run on the tiny world's scripted demonstrations (``tiny.recipes.scripted_demos``: searches,
    poor queries, wrong picks, guesses), whose result is the policy base. Needs the tiny world."""
    KEY = "warmup"
    steps: int = number(0, low=0)        # 0: none; the policy base is models.policy as it is
    questions: int = number(400, low=1)  # train questions demonstrated, 1-hop and 2-hop
    # A flaw that only searching fixes, as the tiny base's (tiny.memory_relations): questions about these
    # relations get memory_demos more demonstrations that answer without a search (a guess, without loss)
    memory_relations: list = choice([], RELATIONS)
    memory_demos: int = number(0, low=0)
    lr: float = number(1e-4, above=0)
    warmup_steps: int = number(10, low=0)
    batch_tokens: int = number(4096, low=1)  # padded tokens per optimizer step
    lora: bool = False                   # True: a LoRA adapter (all linear layers), merged before saving
    lora_r: int = number(16, low=1)
    lora_alpha: int = number(32, above=0)
    bf16_autocast: bool | str = "auto"   # as rl.bf16_autocast

    def __post_init__(self):
        self.bf16_autocast = bf16_setting(self.bf16_autocast, "warmup.bf16_autocast")
        super().__post_init__()


@dataclass
class TinyConfig(_Section):
    """The tiny Qwen3-architecture models and their CPU pretraining (docs/method.md §12)."""
    KEY = "tiny"
    bpe_merges: int = number(1000, low=1)
    hidden_size: int = number(256, low=1)
    intermediate_size: int = number(768, low=1)
    num_layers: int = number(4, low=1)
    num_heads: int = number(4, low=1)
    num_kv_heads: int = number(2, low=1)
    max_positions: int = number(1024, low=1)
    known_fraction: float = number(0.3, **PROBABILITY)  # share of train-split articles the policy reads in pretraining
    demos_per_question: int = number(1, low=0)  # scripted demonstrations per train question
    demo_loss_on_information: bool = False  # True: documents in demonstrations carry loss too
    # Questions whose (last) relation is one of these get `memory_demos` more demonstrations that answer
    # from memory, without a search (tiny.recipes.scripted_demos): a flaw that RL can fix only by searching.
    memory_relations: list = choice(["born_in", "located_in"], RELATIONS)
    memory_demos: int = number(4, low=0)
    guess_loss: bool = True          # False: a guessed answer in a demonstration carries no loss
    restate_topic: bool = False      # every later thought of a demonstration opens with its first thought
    # Phase 1 of each base (copy drills, tiny.recipes.copy_drills): long enough for copying to have formed on
    # every seed and precision tried (it forms abruptly, at a step that varies with both). At 800 steps it had
    # not formed in fp32, for the policy base (docs/results.md, issue 15) and for the simulator base (issue 28).
    copy_warmup_steps: int = number(1600, low=0)  # the simulator base's, names only
    policy_copy_warmup_steps: int = number(1600, low=0)  # the policy base's, with years and titles
    copy_years: float = number(0.0, **PROBABILITY)   # share of the policy's copy drills' items that are years
    copy_titles: float = number(0.0, **PROBABILITY)  # share of the other items that are book or film titles
    copy_warmup_batch_tokens: int = number(1024, low=1)
    copy_drills: int = number(4000, low=0)  # drills mixed into the policy's main phase too
    policy_steps: int = number(900, low=1)
    simulator_steps: int = number(350, low=1)
    answer_drills: int = number(3000, low=0)  # simulator base: answers to copy from a line above
    simulator_copy_steps: int = number(300, low=0)  # simulator base, phase 3: copying names and years
    simulator_copy_batch_tokens: int = number(2048, low=1)
    batch_tokens: int = number(4096, low=1)  # tokens per optimizer step (padded)
    lr: float = number(2e-3, above=0)
    warmup_steps: int = number(30, low=0)
    # auto: on where the CPU has bf16 kernels, fp32 where it would emulate them (many times slower:
    # benchmarks/precision.py, docs/results.md)
    bf16_autocast: bool | str = "auto"

    def __post_init__(self):
        self.bf16_autocast = bf16_setting(self.bf16_autocast, "tiny.bf16_autocast", "cpu")  # the bases train on the CPU
        super().__post_init__()
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ConfigError(f"tiny.hidden_size ({self.hidden_size}) must be a multiple of tiny.num_heads "
                              f"({self.num_heads}), and that of tiny.num_kv_heads ({self.num_kv_heads})")


@dataclass
class RolloutConfig(_Section):
    KEY = "rollout"
    max_turns: int = number(3, low=1)
    max_tokens_per_turn: int = number(48, low=1)
    max_obs_tokens: int = number(256, low=1)
    max_context: int = number(1024, low=1)  # prompt and every turn and document block; above one turn
    temperature: float = number(1.0, low=0)
    top_p: float = number(1.0, above=0, high=1)
    batch_size: int = number(64, low=1)
    backend: str = choice("hf", backends.BACKENDS)  # the generation backend every step uses (zslib/generation/backends.py)

    def __post_init__(self):
        super().__post_init__()
        if self.max_context <= self.max_tokens_per_turn:
            raise ConfigError(f"rollout.max_context ({self.max_context}) must be above rollout.max_tokens_per_turn "
                              f"({self.max_tokens_per_turn}): a context must hold the prompt and at least one turn")


@dataclass
class VLLMConfig(_Section):
    """vLLM engine settings, for ``rollout.backend: vllm`` (zslib/generation/vllm_backend.py) and, unless the
    profile's ``simulator_vllm:`` section overrides some of them, for the simulator's engine in process and
    its server (zslib/serve_simulator.py). The defaults suit the tiny models on a CPU (docs/method.md §17)."""
    KEY = "vllm"
    dtype: str = choice("auto", ("auto",) + DTYPES)  # auto: the model's own dtype (fp32 for the tiny models)
    max_model_len: int = number(1024, low=16)
    enforce_eager: bool = True        # False: compiled graphs (faster decoding, slower start)
    enable_prefix_caching: bool = True  # later turns and group members reuse the prompt's KV cache
    # 256 MiB; the CPU build cannot size the cache itself. 0: use gpu_memory_utilization
    kv_cache_memory_bytes: int = number(268435456, low=0)
    gpu_memory_utilization: float = number(0.3, above=0, high=1)  # GPU share for weights and cache when kv_cache_memory_bytes is 0
    max_num_seqs: int = number(256, low=1)
    seed: int = 0
    # The colocated policy engine frees its GPU memory while the trainer updates (vLLM's sleep mode; the
    # CPU build has none, so there the engine flag is left out and sleeping only pauses the engine)
    sleep_mode: bool = False
    tensor_parallel_size: int = number(1, low=1)  # GPUs one engine's weights are split over
    data_parallel_size: int = number(1, low=1)  # engine copies behind one server (the simulator server only)

    def overridden(self, overrides: dict, key: str) -> VLLMConfig:
        """A copy with ``overrides`` (a profile section's values, their types already checked) in place
        of these values, range-checked with errors naming ``key`` (``simulator_vllm``)."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown key {key}.{unknown[0]} (known: "
                              f"{', '.join(sorted(f.name for f in dataclasses.fields(self)))})")
        cfg = dataclasses.replace(self)
        hints = typing.get_type_hints(VLLMConfig)
        for name, value in overrides.items():
            setattr(cfg, name, _check_type(value, hints[name], f"{key}.{name}"))
        cfg.KEY = key  # this copy's messages name its own section
        _Section.__post_init__(cfg)
        return cfg


@dataclass
class CollectConfig(_Section):
    """Step 1: the collector runs the protocol against the real engine (docs/method.md §6)."""
    KEY = "collect"
    model: str | None = None      # None: the policy base (tiny) / models.policy; else a hub id or path
    split: str = "train"
    n_questions: int = number(1500, low=1)
    temperature: float = number(1.0, low=0)  # sampled, so the same question yields both right and wrong runs
    samples_per_question: int = number(1, low=1)


@dataclass
class LabelingConfig(_Section):
    """Step 2: trajectories -> useful/noisy (query, documents) pairs -> simulator SFT set."""
    KEY = "labeling"
    metric: str = choice("f1", reward.METRICS)  # a trajectory is correct when metric >= threshold
    threshold: float = number(0.5, **PROBABILITY)
    judge: str = choice("none", labeling.JUDGES)  # none (v1) | contains (answer string in the documents) | llm (v2)
    judge_model: str | None = None
    evidence: bool = False        # contains: a dataset's supporting documents count as useful too (see docs/results.md)
    balance: bool = True          # as many useful as noisy pairs
    paired: bool = True           # add each query's other label from the real engine (docs/method.md §6)
    invented: int = number(0, low=0)  # extra paired examples about invented entities (tiny profile)
    answer_first: bool = False    # useful completions state the answer in their first sentence
    max_pairs: int = number(20000, low=1)


@dataclass
class SimulatorConfig(_Section):
    """Step 3: the simulator's prompt, fine-tuning and decoding (docs/method.md §5)."""
    KEY = "simulator"
    prompt: str = choice("finetuned", prompts.SIMULATOR_PROMPTS)  # finetuned | prompt_only
    topk: int = number(5, low=1)  # documents per simulated search
    words_per_doc: int = number(30, low=1)
    max_new_tokens: int = number(200, low=1)
    temperature: float = number(0.8, low=0)
    top_p: float = number(1.0, above=0, high=1)
    lora: bool = True             # False: full fine-tune (cheap for tiny models)
    lora_r: int = number(16, low=1)
    lora_alpha: int = number(32, above=0)
    lora_targets: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"])
    train_lm_head: bool = False   # with LoRA: also train the output layer (tied to embeddings)
    lr: float = number(1e-4, above=0)
    epochs: float = number(1.0, above=0)
    max_steps: int = number(-1, low=-1)  # > 0 overrides epochs; -1: train for epochs
    batch_size: int = number(8, low=1)
    grad_accum: int = number(1, low=1)
    max_length: int = number(512, low=1)
    bf16: bool | str = "auto"     # bf16 autocast; auto: where it is fast (a GPU, or a CPU with bf16 kernels)
    # Recompute activations in the backward pass (TRL's default): memory for time, worth it for a Qwen3
    # simulator on a GPU; the tiny profile turns it off (its SFT steps are faster without; docs/results.md).
    gradient_checkpointing: bool = True
    # Batches of similar lengths (transformers' LengthGroupedSampler): less padding, a little less random order.
    group_by_length: bool = False
    eval_triples: int = number(200, low=1)  # held-out (question, answer, query) triples for notebook 03
    # In RL, tell the simulator the answer of the hop a query asks about (the bridge entity until the
    # query names it), for questions whose data records ``hop_answers``; False: the final answer, as
    # the original does, which lets one search answer a 2-hop question against the simulator only.
    hop_hints: bool = False
    batch_calls: int = number(32, low=1)  # simulated searches per generate call (per HTTP request with serve: http)
    serve: str = choice("inprocess", simulator.TRANSPORTS)  # inprocess: in this process; http: the simulator server
    # With serve: http, an OpenAI-compatible server (python -m zslib.serve_simulator), or a list of them:
    # request chunks go round robin over the list
    url: str | list = "http://127.0.0.1:8001/v1"
    served_name: str = "simulator"  # the model name the server knows the fine-tuned simulator by
    timeout_s: float = number(60.0, above=0)  # per HTTP request
    retries: int = number(3, low=0)  # further tries after a timeout, a dropped connection or a 5xx answer
    threads: int = number(4, low=1)  # HTTP requests in flight at once

    def __post_init__(self):
        self.bf16 = bf16_setting(self.bf16, "simulator.bf16")
        super().__post_init__()
        if self.max_steps == 0:
            raise ConfigError("simulator.max_steps must be -1 (train for simulator.epochs) or at least 1, not 0")
        if isinstance(self.url, list) and (not self.url or not all(isinstance(u, str) and u for u in self.url)):
            raise ConfigError(f"simulator.url must be a URL or a non-empty list of URLs, not {self.url!r}")

    @property
    def urls(self) -> list[str]:
        """``url`` as a list (one server or several)."""
        return list(self.url) if isinstance(self.url, list) else [self.url]


@dataclass
class RLConfig(_Section):
    """Step 4: curriculum RL against the simulator (docs/method.md §7-9); each profile's ``rl:`` section
    sizes the run (tiny: a few minutes on 2 cores; GPU profiles: the original's values)."""
    KEY = "rl"
    algorithm: str = choice("grpo", algos.ALGORITHMS)
    steps: int = number(100, low=1)   # m, the curriculum's length too
    questions_per_step: int = number(8, low=1)
    group_size: int = number(8, low=1)  # rollouts per question (GRPO's group)
    max_hops: int = number(0, low=0)  # > 0: train only on questions with at most this many hops
    # simulator: the fine-tuned simulator; prompt_only: the simulator base prompted to play one (the paper's
    # prompt-based baseline); bm25: the real engine (search:), for comparison
    engine: str = choice("simulator", ("simulator", "prompt_only", "bm25"))
    reward: str = choice("f1", reward.REWARDS)
    loss_mask: bool = True            # False: <information> tokens get gradient too (ablation)
    curriculum: str = choice("exp", curriculum.SCHEDULES)
    p_start: float = number(0.0, **PROBABILITY)
    p_end: float = number(0.5, **PROBABILITY)
    base: float = number(4.0, above=0)
    lr: float = number(1.0e-4, above=0)
    critic_lr: float = number(1.0e-4, above=0)
    warmup_steps: int = number(5, low=0)
    ppo_epochs: int = number(1, low=1)
    mini_batch_size: int = number(32, low=1)  # trajectories per optimizer step
    micro_batch_size: int = number(0, low=0)  # trajectories per forward/backward pass (gradients accumulated); 0: the mini-batch
    # > 0: micro-batches by padded tokens instead (rows sorted by length, as many per pass as fit this budget;
    # a longer row goes alone); the update is the same, the padding less
    micro_batch_tokens: int = number(0, low=0)
    # > 0: log-probs and entropy from the output layer this many positions at a time (full-vocabulary fp32
    # logits for one chunk only); 0: the whole micro-batch at once (fine for a small vocabulary)
    logprob_chunk: int = number(0, low=0)
    gradient_checkpointing: bool = False  # recompute each layer's activations in the backward pass
    # > 0: truncated importance sampling, each token's policy loss weighted by min(pi_old / pi_rollout, tis_cap)
    # with the log-probs vLLM reports for its samples (the rollout/trainer mismatch; verl and TRL offer it)
    tis_cap: float = number(0.0, low=0)
    # With several processes: shard the policy and reference over them (FSDP2), for a policy too large for one GPU
    fsdp: bool = False
    grad_clip: float = number(1.0, above=0)
    clip_low: float = number(0.2, low=0, below=1)
    clip_high: float = number(0.2, low=0)
    clip_c: float = number(3.0, above=1)  # the dual clip's constant for negative advantages
    agg: str = choice("token-mean", algos.AGGREGATIONS)
    kl_coef: float = number(0.001, low=0)
    kl_kind: str = choice("low_var_kl", algos.KL_KINDS)
    entropy_coef: float = number(0.001, low=0)
    gamma: float = number(1.0, **PROBABILITY)
    lam: float = number(1.0, **PROBABILITY)
    value_clip: float = number(0.5, above=0)
    norm_by_std: bool = True
    lora: bool = False                # GPU profiles: a LoRA policy, reference = adapter disabled
    lora_r: int = number(16, low=1)
    lora_alpha: int = number(32, above=0)
    critic_model: str | None = None   # PPO critic backbone; None: a copy of the policy base
    bf16_autocast: bool | str = False  # log-probs and updates under bf16 autocast (true, false or auto as in simulator.bf16)
    checkpoint_every: int = number(25, low=1)
    keep_checkpoints: int = number(2, low=1)
    samples_per_step: int = number(2, low=0)  # trajectories written to samples.jsonl each step
    eval_size: int = number(300, low=1)  # held-out questions for the final greedy evaluation
    validate_every: int = number(0, low=0)  # > 0: greedy EM with the real engine every this many steps (and at the end)
    validation_size: int = number(200, low=1)  # validation questions: the held-out split's last ones, never evaluated on
    validation_two_hop: bool = False  # also validate on the dev split's 2-hop questions; val_em is then the mean of both kinds
    keep_best: bool = True            # with validation: the saved policy is the best-validated step's, not the last

    @property
    def simulated(self) -> bool:
        """Whether RL searches a simulator (which the curriculum's noise applies to)."""
        return self.engine != "bm25"

    def __post_init__(self):
        self.bf16_autocast = bf16_setting(self.bf16_autocast, "rl.bf16_autocast")
        super().__post_init__()
        if self.fsdp and (self.lora or algos.ALGORITHMS[self.algorithm].needs_critic or self.micro_batch_tokens):
            raise ConfigError("rl.fsdp shards a fully fine-tuned policy without a critic, in micro-batches of rows: not "
                              "with rl.lora, rl.algorithm: ppo or rl.micro_batch_tokens (not implemented yet)")
        if self.micro_batch_size > self.mini_batch_size:
            raise ConfigError(f"rl.micro_batch_size ({self.micro_batch_size}) must be at most rl.mini_batch_size "
                              f"({self.mini_batch_size}): a micro-batch is a part of a mini-batch")


@dataclass
class GuardConfig(_Section):
    """The collapse guard (``zslib/guard.py``): after every RL step, the signs that come before a GRPO
    collapse, each against its bar. ``action``: ``off``; ``warn`` (log them in the metrics); ``stop`` (log,
    checkpoint, end the run); ``rollback`` (back to the best-validated weights with the learning rate times
    ``lr_factor``, at most ``max_rollbacks`` times, then stop). Rises and falls compare the mean of the last
    ``window`` steps with the first ``window`` since the start or the last rollback; levels, the last
    ``window``'s mean. No healthy tiny run reached a default bar (33 runs; the nearest, response length, at 72%
    of its bar); the validation drop's was reached when a bf16 run lost its 2-hop searches (docs/results.md)."""
    KEY = "guard"
    action: str = choice("warn", ("off", "warn", "stop", "rollback"))
    window: int = number(3, low=1)
    entropy_rise: float = number(1.0, above=0)        # relative: the policy's token entropy doubled
    entropy_fall: float = number(0.9, above=0, high=1)  # relative: it fell to a tenth (a policy frozen on one output)
    invalid_rise: float = number(0.25, above=0)       # absolute: invalid actions per turn
    invalid_max: float = number(0.5, above=0, high=1)   # level: half the turns leave the protocol's format
    equal_groups_rise: float = number(0.5, above=0)   # absolute: share of groups whose rewards are all equal
    length_rise: float = number(1.0, above=0)         # relative: response tokens doubled
    kl_max: float = number(1.0, above=0)              # KL to the reference, the last window's mean
    val_drop: float = number(0.2, above=0)            # the last validation EM below the best by more than this
    lr_factor: float = number(0.5, above=0, below=1)
    max_rollbacks: int = number(2, low=0)


@dataclass
class ChecksConfig:
    """Expected ranges of the figures each notebook checks (zslib/checks.py): ``{figure: [low, high]}``,
    null for no bound. Empty: nothing checked (the GPU profiles, whose bars are not measured yet)."""
    strict: bool = True               # False: report a figure out of range and continue
    base: dict = field(default_factory=dict)       # notebook 00, the policy base
    simulator: dict = field(default_factory=dict)  # notebook 03, the fine-tuned simulator
    rl: dict = field(default_factory=dict)         # notebook 04, the trained policy

    def __post_init__(self):
        for stage in ("base", "simulator", "rl"):
            try:
                validate_ranges(stage, getattr(self, stage))
            except ValueError as e:
                raise ConfigError(str(e)) from None


def _check_world(world: WorldConfig) -> None:
    """The tiny world's sizes (its dataclass lives with the world, which knows nothing of profiles)."""
    for f in dataclasses.fields(world):
        if f.name.startswith("n_"):
            check_field(f"world.{f.name}", getattr(world, f.name), {"range": (1, None, None, None)})
    fractions = world.split_fractions
    if len(fractions) != 3 or any(not isinstance(x, (int, float)) or x < 0 for x in fractions) \
            or abs(sum(fractions) - 1) > 1e-9:
        raise ConfigError(f"world.split_fractions must be three shares (train, dev, test) >= 0 that add up to 1, "
                          f"not {fractions!r}")


@dataclass
class Profile:
    name: str = "tiny"
    seed: int = 0
    world: WorldConfig = field(default_factory=WorldConfig)
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    thinking: ThinkingConfig = field(default_factory=ThinkingConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    tiny: TinyConfig = field(default_factory=TinyConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    # The simulator's engine (in process with rollout.backend: vllm, and its server): keys of vllm: that
    # differ for it, e.g. its own gpu_memory_utilization; the rest as vllm:. Resolved: simulator_vllm_config
    simulator_vllm: dict = field(default_factory=dict)
    collect: CollectConfig = field(default_factory=CollectConfig)
    labeling: LabelingConfig = field(default_factory=LabelingConfig)
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)

    def __post_init__(self):
        """Settings of different sections that must agree."""
        _check_world(self.world)
        if self.warmup.steps and not self.tiny_world:
            raise ConfigError("warmup.steps > 0 needs the tiny world (data.train_sets: [tiny]): the warm-up "
                              "demonstrates the protocol on its questions")
        if self.rl.tis_cap and self.rollout.backend != "vllm":
            raise ConfigError(f"rl.tis_cap ({self.rl.tis_cap:g}) needs rollout.backend: vllm, whose engine reports "
                              f"the log-probs of its samples (the {self.rollout.backend} backend does not)")
        if self.rollout.backend == "vllm" and self.vllm.max_model_len < self.rollout.max_context:
            raise ConfigError(f"vllm.max_model_len ({self.vllm.max_model_len}) must be at least rollout.max_context "
                              f"({self.rollout.max_context}) with rollout.backend: vllm")
        if self.guard.action == "rollback" and not (self.rl.validate_every > 0 and self.rl.keep_best):
            raise ConfigError("guard.action: rollback goes back to the best-validated weights: it needs "
                              "rl.validate_every > 0 and rl.keep_best: true (or guard.action: stop)")
        simulator_vllm = self.simulator_vllm_config  # checked here, when the profile loads
        # vLLM runs data parallelism only as a server; the engines in this process are single copies
        if self.rollout.backend == "vllm" and self.vllm.data_parallel_size > 1:
            raise ConfigError(f"vllm.data_parallel_size ({self.vllm.data_parallel_size}) must be 1 with rollout.backend: "
                              "vllm (the policy's engine runs in this process); set it in simulator_vllm: for the "
                              "simulator server")
        if (self.rollout.backend == "vllm" and self.simulator.serve == "inprocess"
                and simulator_vllm.data_parallel_size > 1):
            raise ConfigError(f"simulator_vllm.data_parallel_size ({simulator_vllm.data_parallel_size}) must be 1 with "
                              "simulator.serve: inprocess and rollout.backend: vllm; serve the simulator over http "
                              "for data parallelism")

    @property
    def simulator_vllm_config(self) -> VLLMConfig:
        """The simulator engine's settings: ``vllm:`` with the ``simulator_vllm:`` section's keys in place."""
        return self.vllm.overridden(self.simulator_vllm, "simulator_vllm")

    @property
    def is_tiny(self) -> bool:
        """The tiny models, built by notebook 00 (not just the tiny world: see ``tiny_world``)."""
        return self.models.policy == "tiny"

    @property
    def tiny_world(self) -> bool:
        """Questions and corpus from the tiny world (the tiny profile, and real models run on it)."""
        return self.data.train_sets == ["tiny"]

    def model_source(self, name: str) -> str:
        """Where a model named in ``models:`` loads from: a packaged model's converted folder, or the
        hub id or path as given."""
        return str(self.models_dir / name) if name in PACKAGED else name

    @property
    def out(self) -> Path:
        """Everything a run makes: ``outputs/<profile>/``."""
        return ROOT / "outputs" / self.name

    @property
    def data_dir(self) -> Path:
        return self.out / "data"

    @property
    def models_dir(self) -> Path:
        return self.out / "models"

    @property
    def policy_path(self) -> str:
        """The policy base: built (tiny) or warmed up (``warmup``) by notebook 00, else ``models.policy``."""
        if self.is_tiny or self.warmup.steps:
            return str(self.models_dir / "policy-base")
        return self.model_source(self.models.policy)

    @property
    def simulator_path(self) -> str:
        return str(self.models_dir / "simulator-base") if self.models.simulator == "tiny" else self.model_source(self.models.simulator)

    @property
    def trajectories_path(self) -> Path:
        return self.out / "trajectories.jsonl"

    @property
    def sft_path(self) -> Path:
        return self.out / "sim_sft.jsonl"

    @property
    def simulator_dir(self) -> Path:
        """The fine-tuned simulator (LoRA adapter or full weights) and its evaluation."""
        return self.out / "simulator"

    @property
    def rl_dir(self) -> Path:
        """Notebook 04's run: metrics, samples, checkpoints, the trained policy and its evaluation."""
        return self.out / "rl"

    @property
    def corpus_path(self) -> Path:
        return Path(self.search.corpus_path) if self.search.corpus_path else self.data_dir / "corpus.jsonl"


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def yaml_number(value):
    """``value`` as a float when it is a string PyYAML left unread: ``4e-4`` and ``1e6`` (no dot) are strings
    in YAML 1.1 and numbers in YAML 1.2; anything else as it is."""
    return float(value) if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()) else value


def _check_type(value, hint, key: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _check_type(value, option, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: {value!r} is not of type {hint}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(hint, value, key + ".")
    base = origin or hint
    if base is float:
        value = yaml_number(value)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if base in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {base.__name__}, got {value!r}")
    if not isinstance(value, base):
        raise ConfigError(f"{key}: expected {base.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    return cls(**{k: _check_type(v, hints[k], prefix + k) for k, v in values.items()})


def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[parts[-1]] = value


def _profile_path(profile: str | Path) -> Path:
    path = Path(profile)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / f"{profile}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"no profile {profile!r}: {path} does not exist (known: {known})")
    return path


def _merged(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _raw_profile(path: Path, seen: tuple = ()) -> dict:
    """The YAML mapping of a profile; ``extends: <profile>`` starts from another profile's mapping."""
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    parent_path = _profile_path(parent)
    if parent_path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends: {parent}' makes a cycle")
    return _merged(_raw_profile(parent_path, seen + (path.resolve(),)), raw)


def load_profile(profile: str | Path = "tiny", overrides: dict | None = None) -> Profile:
    """Load a profile by name (``configs/<name>.yaml``) or by YAML path, then apply overrides."""
    path = _profile_path(profile)
    raw = _raw_profile(path)
    for k, v in (overrides or {}).items():
        _set_dotted(raw, k, v)
    try:
        return _build(Profile, raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def to_dict(profile: Profile) -> dict:
    return dataclasses.asdict(profile)


def describe(profile: Profile, *sections: str, width: int = 108) -> str:
    """A short summary for a notebook's first cell: the profile, then per section only the values
    that differ from the defaults in this file (the rest are as documented here)."""
    import textwrap

    lines = [f"profile {profile.name!r} (seed {profile.seed}); settings that differ from zslib/config.py's defaults:"]
    for name in sections:
        section = getattr(profile, name)
        default = type(section)()
        changed = [f"{f.name}={getattr(section, f.name)!r}" for f in dataclasses.fields(section)
                   if getattr(section, f.name) != getattr(default, f.name)]
        lines += textwrap.wrap(f"{name}: " + (", ".join(changed) or "all defaults"), width,
                               subsequent_indent="    ")
    # bf16 switches are resolved at load time (``auto``), so say what they came to on this machine, and why.
    from .generation.models import default_device, fast_bf16
    flags = {"tiny": ("bf16_autocast", "cpu"), "simulator": ("bf16", None), "rl": ("bf16_autocast", None)}
    shown = [(f"{name}.{flags[name][0]}={getattr(getattr(profile, name), flags[name][0])}",
              fast_bf16(flags[name][1] or default_device())[1]) for name in sections if name in flags]
    if shown:
        notes = "; ".join(dict.fromkeys(note for _, note in shown))
        lines += textwrap.wrap(f"precision: {', '.join(flag for flag, _ in shown)} ({notes})", width,
                               subsequent_indent="    ")
    return "\n".join(lines)
