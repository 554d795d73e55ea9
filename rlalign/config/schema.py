"""The recipe: a typed tree of small configs, one per component.

Every field has a default except where a run cannot guess; cross-field checks live in
`__post_init__` so a bad recipe fails before any model loads. Messages name the field; the loader
prefixes the file and the section path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from rlalign.config.pairs import PairsConfig


@dataclass(kw_only=True)
class LoraConfig:
    """LoRA adapters through peft."""

    r: int = 8
    """Rank of the adapters."""
    alpha: int = 16
    """Scaling numerator (lora_alpha)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names (suffixes) that get adapters."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass(kw_only=True)
class TinyModelConfig:
    """Sizes of the built-in tiny Llava (used when name_or_path is `builtin:tiny-llava`)."""

    patch_size: int = 16
    """Vision patch side in pixels."""
    vision_hidden: int = 64
    """Hidden size of the vision tower."""
    vision_layers: int = 2
    """Layers of the vision tower."""
    text_hidden: int = 128
    """Hidden size of the text model."""
    text_layers: int = 2
    """Layers of the text model."""
    heads: int = 4
    """Attention heads."""
    vocab_size: int = 512
    """Target BPE vocabulary size."""
    init_seed: int = 0
    """Seed of the random initial weights."""
    init_std: float = 0.1
    """Std of the random initial weights (HF initializer_range)."""

    def __post_init__(self) -> None:
        if self.text_hidden % self.heads or self.vision_hidden % self.heads:
            raise ValueError(f"hidden sizes must be divisible by heads={self.heads}")


@dataclass(kw_only=True)
class ModelConfig:
    """The policy VLM and its reference."""

    name_or_path: str = "builtin:tiny-llava"
    """`builtin:tiny-llava`, a local directory, or a hub id (loaded offline from the local cache)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype of the policy."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    freeze_vision: bool = False
    """Keep the vision tower (and projector) frozen."""
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of all weights."""
    reference: Literal["none", "copy", "adapter_disabled"] = "none"
    """Reference policy: none, a frozen copy sharded like the policy, or the policy with its LoRA adapter off."""
    trust_remote_code: bool = False
    """Allow model code from the checkpoint (off unless the recipe asks)."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = "sdpa"
    """Attention kernel. `flash_attention_2` needs the flash-attn package and cannot take packed rows' block
    masks: preference pairs then run unpacked (each response its own row, the image encoded per row).
    `flex_attention` gets packed rows' masks as a BlockMask; transformers has it for Llava, LLaVA-NeXT,
    Idefics3 and Gemma 3, not for Qwen2-VL / Qwen2.5-VL; torch has no flex backward on CPU."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Sizes for the built-in tiny model."""
    disable_dropout: bool | None = None
    """Set every dropout probability to 0 in policy and reference, LoRA dropout included (as TRL's
    `disable_dropout_in_model`), so the policy's log-probs are not noisier than the reference's. None: on for
    objectives that score against a reference or roll out (dpo, rdpo, grpo, scst), off otherwise (xe);
    resolved when the recipe loads (`rlalign.recipe.load_recipe`)."""

    def __post_init__(self) -> None:
        if self.reference == "adapter_disabled" and self.lora is None:
            raise ValueError("reference 'adapter_disabled' needs model.lora to be set")


@dataclass(kw_only=True)
class DataConfig:
    """Where training and evaluation examples come from."""

    source: Literal["shapes", "shapes_vqa", "local"] = "shapes"
    """`shapes` (the generated world), `shapes_vqa` (counting and colour questions about it, with exact
    answers: `rlalign.shapes_vqa`) or `local` (a dataset on disk or in the local HF cache, see `path`)."""
    path: str | None = None
    """For `local`: a dataset directory (save_to_disk), a .parquet/.arrow/.jsonl file, a folder of them
    (`<split>.<ext>` each), or a hub dataset id resolved offline from the local Hugging Face datasets cache."""
    train_split: str = "train"
    """Split trained on (local data and preference data)."""
    eval_split: str | None = None
    """Split validated on: a name (`validation` and `val` stand for each other). None: `val` / `validation`,
    else `test` (said in the log), else the last 5% of the training split (preference data) or an error."""
    image_column: str = "image"
    """Column holding the image (PIL, bytes or a path)."""
    captions_column: str = "captions"
    """Column holding the reference captions (list of strings, or one string)."""
    seed: int = 0
    """Seed of the shapes world."""
    image_size: int = 48
    """Side of the shapes images."""
    train_size: int = 2000
    """Number of shapes training images."""
    val_size: int = 200
    """Number of shapes validation images."""
    test_size: int = 200
    """Number of shapes test images."""
    prompt: str = ""
    """Text after the image in the prompt (empty for plain captioning)."""
    yes_no_questions: int = 0
    """Shapes world, `xe` only: add this many yes/no object questions to the training split, in POPE's template
    ("Is there a red circle in the image?" -> `yes` / `no`, half each, absent objects drawn at random), so the
    model can answer `rlalign eval pope`. Validation and the other objectives keep the captions only."""
    max_response_tokens: int = 48
    """Responses are cut to this many tokens; image and prompt tokens are never cut."""
    pairs_path: str | None = None
    """Preference data (objectives dpo / rdpo): a save_to_disk folder, a .parquet/.arrow/.jsonl file, or a
    folder of train/val files with TRL columns `images`, `prompt`, `chosen`, `rejected` (+ `retrieved_images`).
    None: synthetic pairs from the shapes world (chosen = a reference caption, rejected = one colour/shape
    word swapped, retrieved image = another shapes image). A relative path may be missing at validation."""
    images_column: str = "images"
    """Preference data: column holding the image (one image, or a list holding one; PIL, bytes or a path)."""
    retrieved_images_column: str = "retrieved_images"
    """Preference data: column holding the retrieved image of each pair (rdpo only)."""
    max_length: int | None = None
    """Preference data: most tokens per sequence (prompt with its image tokens + response); responses are cut
    to fit, and a row whose prompt alone does not fit (its image tokens would be cut) is a bad row."""
    skip_bad_rows: bool = False
    """Drop bad rows (caption or preference data: non-UTF-8 or empty text, missing / unreadable / oversize image,
    prompt too long), logging the counts, instead of failing on the first one with an error naming its file, row
    and column. Caption images are then fully decoded before training, not only their headers."""
    max_image_pixels: int = 4096 * 4096
    """Largest image (width x height) read from data; larger ones are handled as `oversize_images` says. The
    default is well above any processor's largest input resolution and far below a decompression bomb."""
    oversize_images: Literal["error", "downscale"] = "error"
    """An image above `max_image_pixels`: `error` (a bad row, naming its row and column) or `downscale`
    (resized, aspect kept, to fit `max_image_pixels`). Pillow's own limit (PIL.Image.MAX_IMAGE_PIXELS) still
    refuses larger images as decompression bombs."""

    def __post_init__(self) -> None:
        if self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be >= 1, got {self.max_image_pixels}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.source == "local" and not self.path:
            raise ValueError("source 'local' needs data.path")
        if self.eval_split is not None and self.eval_split == self.train_split:
            raise ValueError(f"eval_split '{self.eval_split}' is the training split")
        if self.yes_no_questions < 0:
            raise ValueError(f"yes_no_questions must be >= 0, got {self.yes_no_questions}")
        if self.yes_no_questions and self.source != "shapes":
            raise ValueError(f"yes_no_questions needs data.source 'shapes', got '{self.source}'")
        for name in ("train_size", "val_size", "test_size", "max_response_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(kw_only=True)
class RewardConfig:
    """One term of the training reward; the terms are summed with their weights and logged apart."""

    name: str
    """`cider` (CIDEr-D, df cached from the training references), `bleu` (smoothed sentence BLEU-4),
    `hallucination` (minus the share of mentioned shapes/colours absent from the image; needs ground-truth
    `objects`), `answer_accuracy` / `format` (verifiable rewards: `rlalign.rewards.verifiable`), or a user
    callable `package.module:function`, called TRL's way `fn(completions, prompts, **columns)` when its first
    parameter is named `completions`, else `fn(samples, image_ids, **columns)`."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword settings of a built-in term, checked when the recipe loads (e.g. `answer_accuracy`:
    `extract: answer_tag | last_number | regex | full`, `pattern`, `column`)."""
    weight: float = 1.0
    """Weight of this term in the summed reward."""


@dataclass(kw_only=True)
class RolloutConfig:
    """How completions are sampled (shared by `scst` and `grpo`)."""

    temperature: float = 1.0
    """Sampling temperature."""
    top_k: int = 0
    """Keep the k most likely tokens before sampling (0: all)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1: all)."""
    max_new_tokens: int = 32
    """Longest completion in tokens."""
    shared_prefix: bool | None = None
    """One row per group in the update, old-log-prob and reference forwards, `[prompt | c1 | ... | cG]`:
    the image and the prompt are encoded once per group, not G times (same results as unpacked rows).
    None: on where the family supports it (the families DPO packs, attention other than flash-attention 2)."""

    def __post_init__(self) -> None:
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.max_new_tokens < 1:
            raise ValueError("need temperature > 0, 0 < top_p <= 1, top_k >= 0 and max_new_tokens >= 1")


@dataclass(kw_only=True)
class ObjectiveConfig:
    """Which objective trains the policy, and its settings."""

    OPEN_SECTIONS: ClassVar[str] = "sections"
    """Other mapping-valued keys (`dpo: {beta: 0.1}`) are objective sections, collected raw in `sections`
    and validated against the named objective's own config class when the recipe is resolved."""

    name: str = "xe"
    """A registered objective (see `rlalign ls`) or `module:Class` importable from the working directory."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling of the rollout objectives (`scst`, `grpo`)."""
    rewards: list[RewardConfig] = field(default_factory=lambda: [RewardConfig(name="cider")])
    """Reward terms of the rollout objectives, summed with their weights."""
    sections: dict[str, Any] = field(default_factory=dict)
    """Objective settings by objective name (`objective.<name>.<key>` in the recipe)."""
    settings: Any = None
    """The settings of the chosen objective, built from its section (set by `rlalign.recipe.load_recipe`)."""


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 turns clipping off)."""
    scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    """Decay after warm-up, to 10% of lr for cosine and linear."""
    warmup_steps: int = 0
    """Linear warm-up steps."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps < 0 or self.max_grad_norm < 0:
            raise ValueError("warmup_steps and max_grad_norm must be >= 0")


@dataclass(kw_only=True)
class TrainerConfig:
    """The loop: steps, batches, evaluation and checkpoints."""

    output_dir: str
    """Run folder (required): checkpoints, metrics.jsonl, the resolved recipe, the final model."""
    max_steps: int = 100
    """Optimizer steps."""
    per_device_batch_size: int = 8
    """Examples per process per micro-batch."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step."""
    max_tokens_per_micro: int = 0
    """Token budget of a micro-batch (0: off). A step's rows of a rank (per_device_batch_size x
    grad_accum_steps, the same rows as without a budget) are sorted by length and grouped so that rows x
    longest row <= this budget (a longer row alone); every rank runs as many micro-batches as the rank that
    needs most. XE / DPO / rDPO under single, DDP and FSDP2."""
    seed: int = 0
    """Seed of data order and of sampling."""
    log_every: int = 1
    """Log metrics every this many steps."""
    eval_every: int = 50
    """Validation loss every this many steps (0: only at the end)."""
    eval_size: int = 200
    """Validation examples per evaluation."""
    save_every: int = 0
    """Checkpoint every this many steps (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted."""
    resume: str = "none"
    """`none`, `auto` (latest complete checkpoint in output_dir, if any) or a checkpoint path."""
    num_workers: int = 0
    """DataLoader workers."""
    export_final: bool = True
    """Save the final policy with save_pretrained (+ processor) under output_dir/final."""
    on_nonfinite: Literal["stop", "skip_step"] = "stop"
    """A non-finite loss or gradient norm: `stop` the run with one line naming the step (before the optimizer
    step and before anything is saved), or `skip_step` (drop that update, log it, go on)."""

    def __post_init__(self) -> None:
        for name in (
            "max_steps",
            "per_device_batch_size",
            "grad_accum_steps",
            "log_every",
            "keep_last",
            "eval_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if (
            self.eval_every < 0
            or self.save_every < 0
            or self.num_workers < 0
            or self.max_tokens_per_micro < 0
        ):
            raise ValueError("eval_every, save_every, num_workers and max_tokens_per_micro must be >= 0")


@dataclass(kw_only=True)
class DistributedConfig:
    """How the run is sharded; normally read from the accelerate launch config."""

    backend: Literal["auto", "single", "ddp", "deepspeed", "fsdp2"] = "auto"
    """`auto`: what `accelerate launch` set up (DeepSpeed / FSDP config, or DDP when several processes)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision of the forward."""
    find_unused_parameters: bool = True
    """DDP: tolerate parameters without gradient (VLMs often skip the vision tower's last layer or norm)."""
    fsdp_reshard_after_forward: bool = True
    """FSDP2: free the gathered parameters after forward (ZeRO-3-like); false keeps them (ZeRO-2-like)."""
    fsdp_checkpoint: Literal["sharded", "full"] = "sharded"
    """FSDP2 checkpoints: `sharded` (torch.distributed.checkpoint: every rank writes its own shards of the model
    and optimizer, nothing is gathered; resumes on any number of ranks) or `full` (model and optimizer
    gathered on rank 0 into `model.safetensors` / `optimizer.pt`). The final export is always full."""


@dataclass(kw_only=True)
class TrackingConfig:
    """Where metrics go besides metrics.jsonl and the console."""

    backend: Literal["wandb", "none"] = "wandb"
    """`wandb` or `none` (console and metrics.jsonl only)."""
    project: str = "rlalign"
    """W&B project."""
    run_name: str | None = None
    """W&B run name (default: the output folder's name)."""
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """`auto`: online when WANDB_API_KEY is set, offline otherwise."""
    console_every: int = 50
    """Print a metrics line every this many steps (and at every evaluation); 0: never."""


@dataclass(kw_only=True)
class Recipe:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy and reference models."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and evaluation data."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """The objective and its settings."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """The loop."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Sharding."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Metrics tracking."""
    pairs: PairsConfig = field(default_factory=PairsConfig)
    """RE-ALIGN preference pairs and the image index (`rlalign index build`, `rlalign pairs build`)."""
    description: str = ""
    """One line on what the recipe is for."""
