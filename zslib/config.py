"""Profiles: one dataclass tree, loaded from ``configs/<name>.yaml``, shared by every notebook.

``load_profile("tiny", overrides={"tiny.policy_steps": 50})`` returns a ``Profile``. Unknown
keys and values of the wrong type raise ``ConfigError`` naming the dotted key, so a typo in a
YAML file or a papermill parameter never passes silently.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .checks import validate_ranges
from .world import WorldConfig

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs"


def bf16_setting(value, key: str, device: str | None = None) -> bool:
    """A bf16-autocast switch: ``true`` or ``false`` as given; ``auto``: on where bf16 is fast on
    ``device`` (default: the GPU if there is one, else the CPU), off elsewhere (``models.fast_bf16``)."""
    if isinstance(value, bool):
        return value
    if value != "auto":
        raise ConfigError(f"{key} must be true, false or auto, not {value!r}")
    from .models import default_device, fast_bf16
    return fast_bf16(device or default_device())[0]


class ConfigError(ValueError):
    pass


@dataclass
class DataConfig:
    train_sets: list = field(default_factory=lambda: ["tiny"])  # "tiny" or FlashRAG names
    eval_sets: list = field(default_factory=lambda: ["tiny"])
    local_dir: str | None = None  # folder with <name>/<split>.jsonl|parquet, used before the hub
    eval_size: int = 300          # held-out questions per evaluation set


@dataclass
class SearchConfig:
    engine: str = "bm25"                 # bm25 | web | none
    topk: int = 3
    corpus_path: str | None = None       # None: the tiny world's corpus
    web_url: str = "https://google.serper.dev/search"
    web_provider: str = "serper"
    web_api_key_env: str = "SERPER_API_KEY"
    web_cache_dir: str | None = None


@dataclass
class ModelsConfig:
    policy: str = "tiny"     # "tiny": built by notebook 00; else a hub id or a local path
    simulator: str = "tiny"
    dtype: str = "float32"


@dataclass
class TinyConfig:
    """The tiny Qwen3-architecture models and their CPU pretraining (docs/method.md §12)."""
    bpe_merges: int = 1000
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_positions: int = 1024
    known_fraction: float = 0.3      # share of train-split articles the policy reads in pretraining
    demos_per_question: int = 1      # scripted demonstrations per train question
    demo_loss_on_information: bool = False  # True: documents in demonstrations carry loss too
    # Questions whose (last) relation is one of these get `memory_demos` more demonstrations that answer
    # from memory, without a search (tiny.scripted_demos): a flaw that RL can fix only by searching.
    memory_relations: list = field(default_factory=lambda: ["born_in", "located_in"])
    memory_demos: int = 4
    guess_loss: bool = True          # False: a guessed answer in a demonstration carries no loss
    restate_topic: bool = False      # every later thought of a demonstration opens with its first thought
    copy_warmup_steps: int = 800     # phase 1 of the simulator base: copy drills (see tiny.copy_drills)
    # Phase 1 of the policy base. Copying forms abruptly, at a step that varies with the seed and the
    # precision; at 800 steps it was still forming (loss 0.5 with bf16, 0.97 without), and the base's EM
    # followed: 0.52-0.68 over three seeds, 0.06 without bf16. At 1600 it has formed (loss < 0.1).
    policy_copy_warmup_steps: int = 1600
    copy_years: float = 0.0          # share of the policy's copy drills' items that are years (its warm-up and mix)
    copy_titles: float = 0.0         # share of the other items that are book or film titles
    copy_warmup_batch_tokens: int = 1024
    copy_drills: int = 4000          # drills mixed into the policy's main phase too
    policy_steps: int = 900
    simulator_steps: int = 350
    answer_drills: int = 3000        # simulator base: answers to copy from a line above (tiny.answer_drills)
    simulator_copy_steps: int = 300  # simulator base, phase 3: copying names and years (tiny.answer_copy_phase)
    simulator_copy_batch_tokens: int = 2048
    batch_tokens: int = 4096         # tokens per optimizer step (padded)
    lr: float = 2e-3
    warmup_steps: int = 30
    # auto: on where the CPU has bf16 kernels (1.7x faster with AVX512-BF16), fp32 elsewhere (an AVX2 CPU
    # emulates bf16: a training step of these models took 20.9x as long as in fp32, benchmarks/precision.py).
    bf16_autocast: bool | str = "auto"

    def __post_init__(self):
        self.bf16_autocast = bf16_setting(self.bf16_autocast, "tiny.bf16_autocast", "cpu")  # the bases train on the CPU


@dataclass
class RolloutConfig:
    max_turns: int = 3
    max_tokens_per_turn: int = 48
    max_obs_tokens: int = 256
    max_context: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 64
    backend: str = "hf"           # hf | vllm: the generation backend every step uses (zslib/backends.py)

    def __post_init__(self):
        if self.backend not in ("hf", "vllm"):
            raise ConfigError(f"rollout.backend must be hf or vllm, not {self.backend!r}")


@dataclass
class VLLMConfig:
    """vLLM engine settings, for ``rollout.backend: vllm`` and the simulator server (zslib/vllm_backend.py,
    zslib/serve_simulator.py). The defaults suit the tiny models on a CPU (docs/method.md §17)."""
    dtype: str = "auto"               # auto: the model's own dtype (fp32 for the tiny models); or bfloat16, float32
    max_model_len: int = 1024
    enforce_eager: bool = True        # False: compiled graphs (faster decoding, slower start)
    enable_prefix_caching: bool = True  # later turns and group members reuse the prompt's KV cache
    kv_cache_memory_bytes: int = 268435456  # 256 MiB; the CPU build cannot size the cache itself. 0: use gpu_memory_utilization
    gpu_memory_utilization: float = 0.3     # GPU share for weights and cache when kv_cache_memory_bytes is 0
    max_num_seqs: int = 256
    seed: int = 0

    def __post_init__(self):
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"vllm.dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}")
        if self.max_model_len < 16:
            raise ConfigError(f"vllm.max_model_len must be at least 16, got {self.max_model_len}")
        if self.kv_cache_memory_bytes < 0 or not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("vllm.kv_cache_memory_bytes must be >= 0 and vllm.gpu_memory_utilization in (0, 1]")


@dataclass
class CollectConfig:
    """Step 1: the collector runs the protocol against the real engine (docs/method.md §6)."""
    model: str | None = None      # None: the policy base (tiny) / models.policy; else a hub id or path
    split: str = "train"
    n_questions: int = 1500
    temperature: float = 1.0      # sampled, so the same question yields both right and wrong runs
    samples_per_question: int = 1


@dataclass
class LabelingConfig:
    """Step 2: trajectories -> useful/noisy (query, documents) pairs -> simulator SFT set."""
    metric: str = "f1"            # f1 | em: a trajectory is correct when metric >= threshold
    threshold: float = 0.5
    judge: str = "none"           # none (v1) | contains (answer string in the documents) | llm (v2)
    judge_model: str | None = None
    evidence: bool = False        # contains: a dataset's supporting documents count as useful too (see docs/results.md)
    balance: bool = True          # as many useful as noisy pairs
    paired: bool = True           # add each query's other label from the real engine (docs/method.md §6)
    invented: int = 0             # extra paired examples about invented entities (tiny profile)
    answer_first: bool = False    # useful completions state the answer in their first sentence
    max_pairs: int = 20000


@dataclass
class SimulatorConfig:
    """Step 3: the simulator's prompt, fine-tuning and decoding (docs/method.md §5)."""
    prompt: str = "finetuned"     # finetuned | prompt_only
    topk: int = 5                 # documents per simulated search
    words_per_doc: int = 30
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_p: float = 1.0
    lora: bool = True             # False: full fine-tune (cheap for tiny models)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"])
    train_lm_head: bool = False   # with LoRA: also train the output layer (tied to embeddings)
    lr: float = 1e-4
    epochs: float = 1.0
    max_steps: int = -1           # > 0 overrides epochs
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    bf16: bool | str = "auto"     # bf16 autocast; auto: where it is fast (a GPU, or a CPU with bf16 kernels: 1.8x faster)
    # Recompute activations in the backward pass (TRL's default): memory for time, worth it for a Qwen3
    # simulator on a GPU; the tiny profile turns it off (its SFT steps run 1.26x faster without).
    gradient_checkpointing: bool = True
    # Batches of similar lengths (transformers' LengthGroupedSampler): less padding, a little less random order.
    group_by_length: bool = False
    eval_triples: int = 200       # held-out (question, answer, query) triples for notebook 03
    # In RL, tell the simulator the answer of the hop a query asks about (the bridge entity until the
    # query names it), for questions whose data records ``hop_answers``; False: the final answer, as
    # the original does, which lets one search answer a 2-hop question against the simulator only.
    hop_hints: bool = False
    batch_calls: int = 32         # simulated searches per generate call (per HTTP request with serve: http)
    serve: str = "inprocess"      # inprocess: generate in this process; http: call the simulator server
    url: str = "http://127.0.0.1:8001/v1"  # with serve: http, an OpenAI-compatible server (python -m zslib.serve_simulator)
    served_name: str = "simulator"  # the model name the server knows the fine-tuned simulator by
    timeout_s: float = 60.0       # per HTTP request
    retries: int = 3              # further tries after a timeout, a dropped connection or a 5xx answer
    threads: int = 4              # HTTP requests in flight at once

    def __post_init__(self):
        self.bf16 = bf16_setting(self.bf16, "simulator.bf16")
        if self.serve not in ("inprocess", "http"):
            raise ConfigError(f"simulator.serve must be inprocess or http, not {self.serve!r}")
        if self.timeout_s <= 0 or self.retries < 0 or self.threads < 1:
            raise ConfigError("simulator.timeout_s must be > 0, simulator.retries >= 0, simulator.threads >= 1")


@dataclass
class RLConfig:
    """Step 4: curriculum RL against the simulator (docs/method.md §7-9); each profile's ``rl:`` section
    sizes the run (tiny: about 10 minutes on 2 cores; GPU profiles: the original's values)."""
    algorithm: str = "grpo"           # grpo | ppo | reinforce_pp | reinforce_pp_baseline
    steps: int = 100                  # m, the curriculum's length too
    questions_per_step: int = 8
    group_size: int = 8               # rollouts per question (GRPO's group)
    max_hops: int = 0                 # > 0: train only on questions with at most this many hops
    engine: str = "simulator"         # simulator | bm25 (the real engine, for comparison)
    reward: str = "f1"                # f1 | em | format
    loss_mask: bool = True            # False: <information> tokens get gradient too (ablation)
    curriculum: str = "exp"           # exp | linear | constant
    p_start: float = 0.0
    p_end: float = 0.5
    base: float = 4.0
    lr: float = 1.0e-4
    critic_lr: float = 1.0e-4
    warmup_steps: int = 5
    ppo_epochs: int = 1
    mini_batch_size: int = 32         # trajectories per optimizer step
    grad_clip: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_c: float = 3.0
    agg: str = "token-mean"
    kl_coef: float = 0.001
    kl_kind: str = "low_var_kl"
    entropy_coef: float = 0.001
    gamma: float = 1.0
    lam: float = 1.0
    value_clip: float = 0.5
    norm_by_std: bool = True
    lora: bool = False                # GPU profiles: a LoRA policy, reference = adapter disabled
    lora_r: int = 16
    lora_alpha: int = 32
    critic_model: str | None = None   # PPO critic backbone; None: a copy of the policy base
    bf16_autocast: bool | str = False  # log-probs and updates under bf16 autocast (true, false or auto as in simulator.bf16)
    checkpoint_every: int = 25
    keep_checkpoints: int = 2
    samples_per_step: int = 2         # trajectories written to samples.jsonl each step
    eval_size: int = 300              # held-out questions for the final greedy evaluation
    validate_every: int = 0           # > 0: greedy EM with the real engine every this many steps (and at the end)
    validation_size: int = 200        # validation questions: the held-out split's last ones, never evaluated on
    validation_two_hop: bool = False  # also validate on the dev split's 2-hop questions; val_em is then the mean of both kinds
    keep_best: bool = True            # with validation: the saved policy is the best-validated step's, not the last

    def __post_init__(self):
        self.bf16_autocast = bf16_setting(self.bf16_autocast, "rl.bf16_autocast")


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


@dataclass
class Profile:
    name: str = "tiny"
    seed: int = 0
    world: WorldConfig = field(default_factory=WorldConfig)
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    tiny: TinyConfig = field(default_factory=TinyConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    labeling: LabelingConfig = field(default_factory=LabelingConfig)
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)

    @property
    def is_tiny(self) -> bool:
        return self.models.policy == "tiny"

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
        return str(self.models_dir / "policy-base") if self.is_tiny else self.models.policy

    @property
    def simulator_path(self) -> str:
        return str(self.models_dir / "simulator-base") if self.models.simulator == "tiny" else self.models.simulator

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
    from .models import default_device, fast_bf16
    flags = {"tiny": ("bf16_autocast", "cpu"), "simulator": ("bf16", None), "rl": ("bf16_autocast", None)}
    shown = [(f"{name}.{flags[name][0]}={getattr(getattr(profile, name), flags[name][0])}",
              fast_bf16(flags[name][1] or default_device())[1]) for name in sections if name in flags]
    if shown:
        notes = "; ".join(dict.fromkeys(note for _, note in shown))
        lines += textwrap.wrap(f"precision: {', '.join(flag for flag, _ in shown)} ({notes})", width,
                               subsequent_indent="    ")
    return "\n".join(lines)
