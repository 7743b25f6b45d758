"""The typed run configuration: every field with its type, default and the docstring under it.

Contradictions within a section fail in ``__post_init__``; across sections in
:func:`check_across_sections`. Loading and overrides live in ``loading.py``, the printed key list in
``describe.py``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from lorasmith.errors import ConfigError

DEMO = "demo"
TOOLS_DEMO = "demo-tools"
PREFS_DEMO = "demo-prefs"
BUILTIN_DATA = (DEMO, TOOLS_DEMO, PREFS_DEMO)
"""Generated data sets `data.train` may name: the demo task, and the tool-calling task."""
"""Value of ``data.train`` that selects the built-in, generated field-extraction demo data."""


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"
    """Base model: a Hugging Face id, a local folder, a .gguf file, or the built-in alias smollm2-135m-instruct."""
    gguf_file: str | None = None
    """GGUF file name inside `name` when `name` is a folder or hub repo holding GGUF files."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub repo. Off unless you trust that repo."""
    attn_implementation: Literal["auto", "sdpa", "sdpa_fp32", "eager", "flash_attention_2"] = "auto"
    """Attention kernel; auto picks flash_attention_2 on a supported GPU when installed; on a CPU under bf16,
    sdpa_fp32 (SDPA on fp32 inputs) unless plain sdpa measures clearly faster on this model's heads
    (cached per machine, `lorasmith doctor` shows the figures); else sdpa."""
    cpu_attention_kernel: bool = True
    """Under sdpa_fp32, compiled rows up to the measured length run lorasmith's causal attention kernel (C++,
    built once per machine; models/cpu_attention.py) on CPUs with AMX: the same arithmetic as the bmm path, in
    cache, keeping a log-sum-exp per row rather than a probability per score (AMX Xeon, compiled forward +
    backward per layer: 8 x 112 tokens 2.8 ms against 4.6, 4 x 512 13.5 against 25.9). false keeps the bmm path."""
    cpu_lora_kernel: bool = True
    """Compiled bf16 training on CPUs with AMX: LoRA's rank-r gradient products (B's dY^T h with dY @ B, A's dh^T x)
    run lorasmith's kernel (C++, built once per machine; models/cpu_lora.py), one pass over each wide operand where
    oneDNN makes two at a third of the memory's rate (per layer, caches flushed: 3.1 ms -> 1.7). false keeps oneDNN."""
    chat_template: str | None = None
    """A Jinja chat template file that replaces the tokenizer's own, or a shipped one by name: `chatml-tools`
    (ChatML with Hermes/Qwen2.5-style `<tool_call>` JSON, for tool-calling data on ChatML models)."""
    adapter: str | None = None
    """Start from this adapter (a run folder or a PEFT adapter folder, e.g. an SFT run before DPO): training
    continues it (its r, alpha and target modules; lora.* is not used), and with dpo the adapter as it was is
    the reference. model.name must be its base. The result is one adapter on the base, merged and exported
    like any other."""


@dataclass
class QuantizationConfig:
    bits: Literal[0, 4, 8] = 0
    """Hold the frozen base in 4-bit (QLoRA) or 8-bit with bitsandbytes; 0 = no quantization."""
    type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type: NormalFloat4 (the QLoRA paper's) or plain FP4."""
    double_quant: bool = True
    """Quantize the 4-bit quantization constants too (saves ~0.4 bits per parameter)."""
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Dtype 4-bit weights are dequantized to for matmuls; auto follows train.precision."""


Format = Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion"]
FORMATS: tuple[str, ...] = typing.get_args(Format)
"""Record shapes the data readers know (auto: detected from the first record)."""
Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = typing.get_args(Role)
"""Message roles of the canonical conversation."""


@dataclass
class DataSource:
    path: str
    """A .jsonl/.json/.parquet/.csv file or a datasets save_to_disk folder."""
    format: Format = "auto"
    """Record shape; auto detects it from the first record."""
    weight: float = 1.0
    """Sampling weight: take weight x its records (below 1 subsamples, above 1 repeats), by split_seed."""
    fields: dict[str, str] = field(default_factory=dict)
    """Canonical name -> this source's key, e.g. {messages: dialog, role: speaker, content: text}."""

    def __post_init__(self):
        if self.weight <= 0:
            raise ConfigError(f"data source {self.path}: weight must be > 0, got {self.weight}")


@dataclass
class DataConfig:
    train: str | list[DataSource] = DEMO
    """Training data: a file or datasets folder, `demo` or `demo-tools` (built-in generated tasks: order
    sentences to JSON; tool calling), or a list of sources {path, format, weight, fields} mixed by weight."""
    val: str | None = None
    """Validation data (any supported file). Leave empty to split `val_fraction` off the training data."""
    format: Format = "auto"
    """Record shape of `train` (when a plain path) and `val`: messages, sharegpt, alpaca, prompt_completion."""
    fields: dict[str, str] = field(default_factory=dict)
    """Custom key names for `train` (plain path) and `val`, e.g. {messages: dialog}."""
    val_fraction: float = 0.0
    """Fraction of the training records held out for validation when `val` is not given."""
    split_seed: int = 0
    """Seed of the train/validation split."""
    max_length: int = 1024
    """Longest tokenized conversation, in tokens."""
    over_length: Literal["truncate", "truncate_history", "drop"] = "truncate"
    """Longer conversations: keep the start; drop the oldest whole turns (system prompt kept); or drop them."""
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    """Which messages carry loss: every assistant turn, only the last one, or every message."""
    loss_weights: dict[str, float] = field(default_factory=dict)
    """Per-role loss weights overriding train_on for those roles, e.g. {assistant: 1.0, user: 0.1, system: 0.0}.
    Tool results (role `tool`) are never trained unless given a weight here."""
    train_reasoning: bool = True
    """Train the assistant's reasoning (`reasoning_content`, or `thinking`): false leaves the reasoning text out
    of the loss (its <think> markers and the answer stay trained)."""
    skip_bad_records: bool = False
    """Skip (and count) invalid records instead of stopping on the first file with errors."""

    def __post_init__(self):
        if self.val and self.val_fraction:
            raise ConfigError(
                "data.val and data.val_fraction are both set",
                hint="give a validation file or a fraction to split off, not both",
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_length < 16:
            raise ConfigError(f"data.max_length must be at least 16, got {self.max_length}")
        for role, w in self.loss_weights.items():
            if role not in ROLES or w < 0:
                raise ConfigError(f"data.loss_weights: {role}: {w} (roles: {', '.join(ROLES)}; weights >= 0)")
        if isinstance(self.train, list) and not self.train:
            raise ConfigError("data.train is an empty list of sources")


@dataclass
class LoraConfig:
    r: int = 16
    """LoRA rank."""
    alpha: float = 32.0
    """LoRA scaling numerator: updates are scaled by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout on the LoRA input. Off by default: on CPU its random masks cost 20% of a training step."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or `all-linear` (every linear layer except the LM head)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""

    def __post_init__(self):
        if self.r < 1:
            raise ConfigError(f"lora.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError("lora.target_modules is empty", hint="use all-linear or name modules, e.g. [q_proj, v_proj]")
        if self.target_modules == ["all-linear"]:  # `target_modules: all-linear` read as a one-item list
            self.target_modules = "all-linear"


@dataclass
class TrainConfig:
    objective: Literal["sft", "dpo", "orpo"] = "sft"
    """sft: next-token loss on the trained turns; dpo: Direct Preference Optimization on preference pairs (the
    reference is the base with the adapter disabled: no second model); orpo: odds-ratio preference optimization
    (the chosen side's NLL plus an odds-ratio term, no reference). dpo/orpo read data as prompt/chosen/rejected
    pairs (README: "Preference tuning")."""
    beta: float = 0.1
    """dpo: the strength of the KL tie to the reference (higher stays closer); orpo: the weight of the
    odds-ratio term (ORPO's lambda)."""
    label_smoothing: float = 0.0
    """dpo: the assumed share of pairs whose preference label is wrong (conservative DPO); 0 = plain sigmoid DPO."""
    reference: Literal["precompute", "on_the_fly"] = "precompute"
    """dpo: reference log-probs computed once before training (one forward pass over the pairs without the
    adapter), or in every step (one more forward per step; no pass up front)."""
    epochs: float = 1.0
    """Passes over the training data (fractions allowed). Ignored when max_steps > 0."""
    max_steps: int = 0
    """Optimizer steps to run; 0 means derive from epochs."""
    micro_batch_size: int | Literal["auto"] = 8
    """Conversations per forward/backward pass, or auto: the largest that fits train.memory_budget_gb."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = micro_batch_size x grad_accum)."""
    micro_batch_tokens: int = 0
    """Token-budget batching: fill each micro-batch with conversations of similar length up to this many padded
    tokens, instead of micro_batch_size conversations; the effective batch is then ~micro_batch_tokens x grad_accum
    tokens (the loss stays normalised by trained tokens). 0 = off."""
    pad_to_multiple_of: int = 16
    """Right-pad each micro-batch's rows to a multiple of this many tokens (1: to its longest row only). Pads
    follow every real token and carry no loss, so loss and gradients are those of the unpadded batch; what
    changes is how many distinct matmul shapes a run meets. On a CPU oneDNN builds kernels for each new
    shape (~4 ms against ~0.7 to run a [700, 576] x [576, 1536] product, ~25 shapes a step) and keeps
    ~1,024, so with unpadded widths nearly every step rebuilds them; 16 leaves 32 widths up to 512 tokens and
    is the row count of an AMX tile (AMX Xeon, `lorasmith bench`, lorasmith row: 1,037-1,054 real tok/s
    unpadded, 1,138-1,158 at 8, 1,150-1,173 at 16). Never past the training set's longest conversation (no
    position beyond a real row's); packed micro-batches are not padded. train.max_batch_tokens
    counts the padded width; train.micro_batch_tokens fills micro-batches by their rows' own lengths."""
    packing: bool = False
    """Padding-free packing: each micro-batch becomes one row with positions restarting per conversation
    (flash-attention's variable-length kernels on GPU). On CPU length grouping is as fast (see docs/benchmarks.md)."""
    max_batch_tokens: int | Literal["auto"] = "auto"
    """Cap on a micro-batch's padded size (rows x longest row): larger planned micro-batches run in pieces
    whose gradients are accumulated (same result), bounding activation memory. 0 = no cap. auto = measured
    on a CPU: the fewest tokens (2048, 4096 or 8192) at which this model's projections run within 10% of
    their best rate on this machine, as far as half the free memory holds their activations (at least
    2048; 2048 on GPUs and for preference pairs, not measured there yet). Only measured when a planned
    micro-batch can be larger than 2048 tokens; cached per machine (README: "Training")."""
    effective_batch_size: int = 0
    """Conversations per optimizer step; required with micro_batch_size=auto, else micro_batch_size x grad_accum."""
    memory_budget_gb: float = 0.0
    """Memory the micro_batch_size=auto probe may fill (0: 90% of available RAM on CPU, of free memory on a GPU)."""
    lr: float | Literal["auto"] = "auto"
    """Peak learning rate of AdamW; auto = a learning-rate range test on this run's model and data picks it
    before training (~20 short steps, cached; README: "Learning rate")."""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA weights."""
    warmup_ratio: float = 0.05
    """Fraction of the steps spent warming the learning rate up linearly from 0."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    order: Literal["length", "shuffle", "curriculum"] = "length"
    """Data order per epoch (seeded): length = shuffled, then similar lengths batched together (least padding);
    shuffle = plain random order; curriculum = first epoch from shortest to longest conversation, then as length."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this value (0 disables clipping); the pre-clip norm is logged."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute precision: auto = bf16 where the CPU/GPU supports it, else fp32."""
    base_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Dtype the frozen base weights are held in; auto = bf16 when training in bf16 (half the memory, no
    per-step weight casts), else fp32. LoRA weights and optimizer state stay fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile the decoder layers and the loss for training steps (evaluation stays eager): fused
    elementwise work and, for rows up to a measured length (256-384 tokens on the bench CPU), a matmul attention
    (models/attention.py). auto = on a CPU with a C++ compiler
    for bases of 50M+ parameters (bench CPU: +28%, 581 vs 455 tok/s, after ~10 s of compiling, ~40 s on a
    fresh machine, cached across runs; docs/benchmarks.md); off on GPUs and quantized bases until measured
    there (true to try). Falls back to eager if compiling fails."""
    seed: int = 42
    """Seed of LoRA initialisation, dropout and data order."""
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"
    """With several processes (torchrun, or `lorasmith train --nproc N`): ddp = each holds the whole model and
    the LoRA gradients are all-reduced; fsdp = FSDP2 shards the decoder layers (frozen base, LoRA weights,
    optimizer state) over the processes, for a base that does not fit one device; auto = ddp. Ignored on one."""
    distributed_timeout_minutes: float = 30.0
    """How long a process waits for the others in one collective before it stops with an error."""
    log_every: int = 1
    """Write a metrics line every N optimizer steps."""
    eval_every: int = 0
    """Validation loss every N steps (0: only before and after training)."""
    save_every: int = 0
    """Checkpoint every N steps (0: by the clock only, see save_every_minutes)."""
    save_every_minutes: float = 10.0
    """Checkpoint when this many minutes have passed since the last one (0: off), so a run killed anywhere
    loses at most this much work. Stretched if needed so that saving stays under 2% of the run's time."""
    stop_grace_s: float = 30.0
    """Seconds between SIGTERM and the kill that follows (spot/preemptible machines give 30-120): the step in
    flight is finished only if it and a checkpoint fit in this time, else it is abandoned and the state
    before it is saved."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss or gradient norm: stop (keep the last good checkpoint) or skip that update."""
    max_skipped_steps: int = 5
    """With on_nonfinite=skip, stop after this many non-finite steps in a row."""

    def __post_init__(self):
        if self.beta <= 0:
            raise ConfigError(f"train.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"train.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.objective != "sft" and (self.packing or self.micro_batch_size == "auto"):
            key = "train.packing" if self.packing else "train.micro_batch_size=auto"
            raise ConfigError(
                f"{key} is not available with train.objective={self.objective}",
                hint="preference pairs run as padded chosen/rejected rows: set train.micro_batch_size (pairs per micro-batch)",
            )
        if self.max_steps < 0:
            raise ConfigError(f"train.max_steps must be >= 0, got {self.max_steps}")
        if self.max_steps == 0 and self.epochs <= 0:
            raise ConfigError("train.epochs must be > 0 when train.max_steps is 0")
        if self.max_batch_tokens != "auto" and self.max_batch_tokens < 0:
            raise ConfigError(f"train.max_batch_tokens must be >= 0 or auto, got {self.max_batch_tokens}")
        for key in ("grad_accum", "log_every", "keep_checkpoints", "max_skipped_steps", "pad_to_multiple_of"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.micro_batch_tokens < 0:
            raise ConfigError(f"train.micro_batch_tokens must be >= 0, got {self.micro_batch_tokens}")
        if self.micro_batch_tokens and self.micro_batch_size == "auto":
            raise ConfigError(
                "train.micro_batch_tokens and train.micro_batch_size=auto both size the micro-batch", hint="use one"
            )
        if self.micro_batch_size == "auto":
            if self.effective_batch_size < 1:
                raise ConfigError(
                    "train.micro_batch_size=auto needs train.effective_batch_size",
                    hint="e.g. train.effective_batch_size=16: the probe picks the micro-batch, accumulation makes up the rest",
                )
        elif self.micro_batch_size < 1:
            raise ConfigError(f"train.micro_batch_size must be >= 1 or auto, got {self.micro_batch_size}")
        elif self.effective_batch_size and self.effective_batch_size != self.micro_batch_size * self.grad_accum:
            raise ConfigError(
                f"train.effective_batch_size={self.effective_batch_size} contradicts micro_batch_size x grad_accum = "
                f"{self.micro_batch_size} x {self.grad_accum}",
                hint="set one of them, or use micro_batch_size=auto with effective_batch_size",
            )
        if self.lr != "auto" and self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.save_every_minutes < 0 or self.stop_grace_s < 0:
            raise ConfigError("train.save_every_minutes and train.stop_grace_s must be >= 0")
        if self.distributed_timeout_minutes <= 0:
            raise ConfigError(f"train.distributed_timeout_minutes must be > 0, got {self.distributed_timeout_minutes}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"train.max_grad_norm must be >= 0, got {self.max_grad_norm}")


@dataclass
class EvalConfig:
    exact_match: int = 0
    """Greedy-generate the last assistant turn of the first N validation conversations and score exact
    match, before and after training (0: off, -1: all)."""
    tool_calls: int = 100
    """When exact_match is 0 and the validation data calls tools: the first N validation conversations are
    generated all the same and scored for tool-call accuracy and exact match (0: off, -1: all)."""
    samples: int = 3
    """Validation conversations whose answers are shown and saved before and after training."""
    max_new_tokens: int = 128
    """Longest generated answer."""
    batch_size: int = 16
    """Conversations generated at once."""
    max_batches: int = 0
    """Validation-loss batches to evaluate (0: the whole validation set)."""
    metrics: list[str] = field(default_factory=list)
    """Scores of the generated answers (those of eval.exact_match), before and after training and every
    train.eval_every steps: exact_match, normalised_match, json_valid, json_equal, rouge_l, chrf, and your own
    as module:function or file.py:function (called with predictions and references, like compute_metrics)."""

    def __post_init__(self):
        if self.metrics and not self.exact_match:
            raise ConfigError("eval.metrics scores generated answers: set eval.exact_match (how many, -1 for all)")


@dataclass
class OutputConfig:
    dir: str = "runs"
    """Folder that holds the run folders."""
    name: str | None = None
    """Run folder name; default: the config file's stem plus a timestamp."""
    overwrite: bool = False
    """Replace an existing run folder of the same name."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=list)
    """Trackers that receive the metrics, config and answers besides metrics.jsonl (pip install 'lorasmith[trackers]');
    all work offline: TensorBoard event files in the run folder, W&B in offline mode unless WANDB_MODE/WANDB_API_KEY,
    MLflow in a SQLite store in the run folder unless MLFLOW_TRACKING_URI."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model."""
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    """QLoRA: the base model quantized with bitsandbytes (pip install 'lorasmith[qlora]')."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and validation data."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """The adapter."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation before and after training."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Where the run is written."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_across_sections(cfg: Config) -> None:
    if cfg.quantization.bits and cfg.lora.use_dora and cfg.quantization.bits == 8:
        raise ConfigError("lora.use_dora with quantization.bits=8 is not supported by peft", hint="use 4-bit or plain LoRA")
    if cfg.eval.exact_match and not (cfg.data.val or cfg.data.val_fraction or cfg.data.train in BUILTIN_DATA):
        raise ConfigError(
            "eval.exact_match needs validation data",
            hint="set data.val to a file or data.val_fraction to e.g. 0.1",
        )
