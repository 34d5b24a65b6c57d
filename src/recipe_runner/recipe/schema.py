"""The recipe schema: NxDT's recipe keys, typed, plus the project's own `runner:` section.

Every NxDT key of the Llama 3 DPO/ORPO configs is accepted with its NxDT meaning, so a recipe
from the tutorial loads unchanged. Models forbid unknown keys, which is how a typo becomes an
error with a did-you-mean instead of a silently ignored setting. Cross-key rules that need the
whole recipe (batch divisibility, prompt length vs sequence length, ...) live in
`recipe.checks`, so this file stays a plain description of the keys.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr


class Strict(BaseModel):
    """Base: unknown keys are errors; values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --------------------------------------------------------------------------- trainer
class Trainer(Strict):
    devices: int = Field(1, ge=1, description="processes (NeuronCores / GPUs / CPU workers) per node")
    num_nodes: int = Field(1, ge=1)
    max_epochs: int = -1
    max_steps: int = -1
    log_every_n_steps: int = Field(10, ge=1)
    val_check_interval: Union[int, float] = Field(500, description="steps (int) or fraction of an epoch (float <= 1)")
    check_val_every_n_epoch: Optional[int] = None
    num_sanity_val_steps: int = 0
    limit_val_batches: Union[int, float] = 1.0
    limit_test_batches: Union[int, float] = 0.0
    gradient_clip_val: Optional[float] = 1.0


# --------------------------------------------------------------------------- exp_manager
class CheckpointCallbackParams(Strict):
    monitor: Literal["step"] = "step"
    save_top_k: int = Field(1, ge=-1)
    mode: Literal["max"] = "max"
    save_last: bool = False
    filename: str = "{name}--{step}-{consumed_samples}"
    model_parallel_size: Optional[int] = None
    every_n_train_steps: int = Field(1000, ge=1)
    use_master_weights_in_ckpt: bool = False


class ExpManager(Strict):
    log_local_rank_0_only: bool = True
    create_tensorboard_logger: bool = True
    explicit_log_dir: Optional[str] = None
    exp_dir: Optional[str] = None
    name: str = "hf_llama"
    resume_if_exists: bool = True
    resume_ignore_no_checkpoint: bool = True
    create_checkpoint_callback: bool = True
    checkpoint_callback_params: CheckpointCallbackParams = CheckpointCallbackParams()
    log_parameter_norm: bool = True
    log_gradient_norm: bool = True
    enable_recovery_time_instrumentation: bool = False
    save_xser: bool = True
    load_xser: bool = True
    save_bf16: bool = False
    async_checkpointing: bool = False
    resume_from_checkpoint: Optional[str] = Field(
        None, description="starting weights: a Hugging Face model dir or an NxD-layout checkpoint dir")
    ckpt_ptl_version: Optional[str] = None


# --------------------------------------------------------------------------- distributed_strategy
class DistributedStrategy(Strict):
    tensor_model_parallel_size: int = Field(1, ge=1)
    pipeline_model_parallel_size: int = Field(1, ge=1)
    virtual_pipeline_model_parallel_size: int = Field(1, ge=1)
    zero1: bool = True
    sequence_parallel: bool = False
    kv_replicator: int = Field(1, ge=1)


# --------------------------------------------------------------------------- data
class Tokenizer(Strict):
    type: str = Field(..., description="tokenizer directory (Hugging Face format)")


class Data(Strict):
    micro_batch_size: int = Field(1, ge=1, description="pairs per forward (chosen and rejected run together)")
    global_batch_size: int = Field(..., ge=1, description="pairs per optimizer step, over all data-parallel ranks")
    train_dir: str
    val_dir: Optional[str] = None
    dev_choose_samples: Optional[int] = Field(None, ge=1)
    seq_length: int = Field(..., ge=2)
    tokenizer: Tokenizer


# --------------------------------------------------------------------------- model
class Fusions(Strict):
    softmax: bool = True
    flash_attention: bool = True


class Optim(Strict):
    name: str = "adamw_fp32OptState"
    lr: float = Field(..., gt=0)
    weight_decay: float = Field(0.01, ge=0)
    capturable: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: Optional[float] = Field(None, gt=0, description="default: 1e-6 for adamw_fp32OptState, 1e-8 for adamw/adam")
    sched: dict[str, Any] = Field(default_factory=lambda: {"name": "LinearAnnealingWithWarmUp", "warmup_steps": 0})


class Model(Strict):
    model_config_path: str = Field(..., alias="model_config", description="Hugging Face config.json of the model")
    encoder_seq_length: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    qkv_linear: bool = True
    fuse_qkv: bool = False
    rope_theta: Optional[float] = None
    use_cpu_initialization: bool = True
    weight_init_only: bool = True
    activations_checkpoint_granularity: Optional[Literal["full", "selective"]] = None
    activations_checkpoint_recompute: Optional[Any] = None
    fusions: Fusions = Fusions()
    do_layer_norm_weight_decay: bool = True
    optim: Optim

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True,
                              protected_namespaces=())


# --------------------------------------------------------------------------- alignment
class DPO(Strict):
    kl_beta: float = Field(0.01, gt=0)
    loss_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="conservative DPO (sigmoid only)")
    max_prompt_length: int = Field(..., ge=1)
    precompute_ref_log_probs: bool = True
    truncation_mode: Literal["keep_start", "keep_end"] = "keep_start"


class ORPO(Strict):
    beta: float = Field(0.1, gt=0)
    max_prompt_length: int = Field(..., ge=1)
    truncation_mode: Literal["keep_start", "keep_end"] = "keep_start"
    nll_scope: Literal["response", "sequence"] = Field(
        "response", description="response: NxDT (response tokens only); sequence: TRL/paper (prompt + response)")


class Alignment(Strict):
    dpo: Optional[DPO] = None
    orpo: Optional[ORPO] = None


# --------------------------------------------------------------------------- precision
class Precision(Strict):
    type: Literal["bf16SR", "fp32", "autocast", "mixed_precision", "mixed_precisionSR", "manual"] = "mixed_precision"
    master_weights: bool = False
    fp32_grad_acc: bool = False
    xla_use_bf16: Union[str, int] = "0"
    xla_downcast_bf16: Union[str, int] = "0"
    neuron_rt_stochastic_rounding_en: Union[str, int] = "0"


# --------------------------------------------------------------------------- runner (ours)
class Source(Strict):
    uri: str = Field(..., description="s3://bucket/key, https://..., hf://org/name, hf://datasets/org/name, or a path")
    dest: str = Field(..., description="where the file or directory lands (shared volume)")
    sha256: Optional[str] = None
    revision: Optional[str] = None


class PrepareData(Strict):
    input: str
    format: Literal["preference", "orca", "fields", "hh"] = "preference"
    fields: Optional[dict[str, str]] = None
    chat_template: bool = False
    tokenizer: Optional[str] = None
    validation_fraction: float = Field(0.0, ge=0, lt=1)
    split_seed: int = 1234
    output: str
    validation_output: Optional[str] = None


class ConvertCheckpoint(Strict):
    input: str = Field(..., description="Hugging Face model directory to convert")
    output: str = Field(..., description="NxD-layout directory written (usually exp_manager.resume_from_checkpoint)")


class RunnerData(Strict):
    padding: Literal["static", "dynamic"] = Field(
        "static", description="static: every row padded to seq_length (one shape for compilers); dynamic: to the batch's longest")
    skip_invalid: bool = False
    shuffle: bool = True
    packing: bool = Field(False, description="several pairs per row of 2 x seq_length (micro_batch_size rows per "
                                             "forward), attention confined to each sequence")
    prefix_sharing: bool = Field(False, description="each prompt computed once, both responses attend to it")


class Runner(Strict):
    device: Literal["auto", "cpu", "cuda", "xla"] = "auto"
    cache_dir: Optional[str] = Field(None, description="tokenized data and reference log-probs; default <run_dir>/cache")
    trust_remote_code: bool = False
    sources: dict[str, Source] = Field(default_factory=dict)
    prepare_data: Optional[PrepareData] = None
    convert_checkpoint: Optional[ConvertCheckpoint] = None
    data: RunnerData = RunnerData()
    attention: Literal["auto", "sdpa", "eager", "flex_attention"] = Field(
        "auto", description="attention implementation. auto: flex_attention on cuda with packing or prefix sharing (skips masked "
                            "tiles), eager on xla, sdpa otherwise. flex_attention trains only on cuda")


# --------------------------------------------------------------------------- the recipe
class Recipe(Strict):
    name: str = "hf_llama"
    model_source: Literal["hf"] = "hf"
    seed: int = 1234
    trainer: Trainer = Trainer()
    exp_manager: ExpManager = ExpManager()
    distributed_strategy: DistributedStrategy = DistributedStrategy()
    data: Data
    model: Model
    model_alignment_strategy: Alignment = Alignment()
    precision: Precision = Precision()
    compiler_flags: Optional[str] = "--model-type transformer"
    compiler_cache_url: Optional[str] = None
    aync_exec_max_inflight_requests: int = Field(5, description="NxDT's real (misspelt) key")
    bucket_size_collectives: int = 1024
    neuron_rt_exec_timeout: int = 100
    neuron_experimental_compress_rg: bool = False
    runner: Runner = Runner()

    _source_path: Optional[str] = PrivateAttr(None)
    _resolved: dict = PrivateAttr(default_factory=dict)
    _explicit_keys: frozenset = PrivateAttr(frozenset())

    # -- derived views used everywhere; one place to compute them
    @property
    def source_path(self) -> Optional[str]:
        return self._source_path

    @property
    def resolved(self) -> dict:
        """The recipe after interpolation and overrides, as plain data (what provenance stores)."""
        return self._resolved

    @property
    def explicit_keys(self) -> frozenset:
        """Dotted keys written in the recipe file or overrides (not defaults)."""
        return self._explicit_keys

    @property
    def algorithm(self) -> str:
        return "dpo" if self.model_alignment_strategy.dpo is not None else "orpo"

    @property
    def alignment(self) -> Union[DPO, ORPO]:
        return self.model_alignment_strategy.dpo or self.model_alignment_strategy.orpo

    @property
    def world_size(self) -> int:
        return self.trainer.devices * self.trainer.num_nodes

    @property
    def model_parallel_size(self) -> int:
        ds = self.distributed_strategy
        return ds.tensor_model_parallel_size * ds.pipeline_model_parallel_size

    def data_parallel_size(self, device: str) -> int:
        """Ranks that see different data. Tensor/pipeline sharding only exists on the xla backend;
        on cpu/cuda every process is a data-parallel rank."""
        if device == "xla":
            return self.world_size // self.model_parallel_size
        return self.world_size
