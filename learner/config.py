"""The learner's section of the config tree."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from learner.losses import LossConfig, TopKKLConfig
from protocol.files import UserPath


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    heldout_file: UserPath = Field("", description="JSONL held-out prompts; empty disables evaluation.")
    teacher_dir: UserPath = Field("", description="Teacher used to measure the held-out reverse KL.")
    every: int = Field(0, ge=0, description="Evaluate every N steps (0: only at start and end).")
    num_prompts: int = Field(32, ge=1, description="Held-out prompts per evaluation.")
    max_new_tokens: int = Field(64, ge=1, description="Full-length generation budget at evaluation.")
    accuracy_prompts: int = Field(
        0, ge=0, description="Also measure greedy exact match on the first N held-out prompts (0: off): the greedy "
        "completion, stopped at EOS, must be the line's `response` (or `continuation`) text exactly and end with EOS.")
    use_chat_template: bool | None = Field(
        None, description="Set from actor.use_chat_template by the composed config: held-out prompts are encoded "
        "exactly as training prompts (a different value is an error).")
    add_bos: bool | None = Field(
        None, description="Set from actor.add_bos by the composed config (a different value is an error).")


class LearnerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_dir: UserPath = Field("", description="Initial student (Hugging Face format).")
    workdir: UserPath = Field("runs/learner", description="Checkpoints and published weights go under here.")
    steps: int = Field(100, ge=1, description="Optimizer steps to train.")
    max_flops: float | None = Field(
        None, gt=0, description="Also stop (and drain) once the run has spent this many FLOPs: generation + teacher "
        "scoring + learner, from the run stats every role adds to (protocol/compute.py). None: steps alone decide.")
    max_flops_charges_cache: bool = Field(
        False, description="Count the teacher forwards that full cache hits avoided as spent toward max_flops "
        "(every teacher-scored token charged, cached or not: what a compute-matched comparison needs; the "
        "truncation experiment sets it). False: only what was really computed.")
    batch_size: int = Field(16, ge=1, description="Prefixes per optimizer step (global batch: under torchrun the "
                            "ranks share it).")
    micro_batch_tokens: int = Field(4096, ge=16, description="Token budget of one micro-batch (gradient accumulation); "
                                    "capped further by learner.max_logits_mb at a large vocabulary.")
    max_logits_mb: int = Field(1024, ge=1, description="Memory a micro-batch's vocabulary-sized tensors may take "
                               "(logits, log-softmax and their gradients: LOGITS_COPIES fp32 copies of tokens x vocab): "
                               "the micro-batch's token budget is cut to fit. At 49k tokens of vocabulary 1 GiB is "
                               "~1,365 tokens; tiny vocabularies are never cut.")
    loss: LossConfig = Field(default_factory=TopKKLConfig, description="Distillation loss (one file each in "
                             "learner/losses/); a bare name such as `topk_kl` means that loss with its defaults. "
                             "Unset: the exact reverse KL on the teacher's top-k (`topk_kl`, tail bucket), or "
                             "`sampled_reverse_kl` when teacher.topk is 0 (docs/learner.md, 'Which loss').")
    position_gamma: float = Field(0.0, ge=0, description="Position-weighted OPD strength (0: off).")
    horizon_discount: float = Field(1.0, gt=0, le=1, description="Per-position discount (1: off).")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Global gradient-norm clip.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up.")
    max_staleness: int = Field(4, ge=0, description="Drop samples whose policy version lags by more than this.")
    kl_bucket_tokens: int = Field(16, ge=1, description="Width in response positions of a bucket of the reverse KL by "
                                  "position that the learner publishes (LearnerState.kl_windows; the adaptive schedule "
                                  "reads it).")
    kl_buckets: int = Field(64, ge=1, le=4096, description="Buckets of the KL by position; the last also holds every "
                            "later position (64 x 16 covers 1024 tokens).")
    kl_window_steps: int = Field(4, ge=1, description="Steps per published window of the KL by position.")
    kl_history: int = Field(16, ge=2, le=256, description="Windows of the KL by position kept in the published state.")
    publish_every: int = Field(1, ge=1, description="Publish weights to the actors every N steps; at most "
                               "learner.max_staleness + 1, or every sample is stale before the next publication.")
    keep_published: int = Field(3, ge=1, description="Published weight directories kept.")
    checkpoint_every: int = Field(
        50, ge=1, description="Checkpoint every N steps. Steps since the last checkpoint are replayed from "
        "the step journal in Redis after a crash, which holds up to N x batch_size messages.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept.")
    read_timeout_s: float = Field(
        600.0, gt=0, description="Fail loudly if no data arrives for this long (also bounds the drain at the end).")
    drain: bool = Field(True, description="After the last step, train on or drop what is still in flight.")
    fsdp: bool = Field(False, description="Under torchrun: shard the student with FSDP2 (fully_shard) instead of "
                       "replicating it with DDP, for students that do not fit one device.")
    dist_timeout_s: float = Field(
        1800.0, gt=0, description="Under torchrun: longest wait for the other ranks at a collective before "
        "failing (must exceed read_timeout_s: a rank may wait that long for data).")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (bf16 autocast on CUDA).")
    seed: int = Field(0, description="Seed of the learner's RNGs.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus port (0: a free port; under torchrun "
                              "each rank adds its local rank).")
    metrics_host: str = Field("127.0.0.1", description="Bind address of /metrics.")
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _publications_outpace_staleness(self) -> LearnerConfig:
        """Refuse a publication period that makes every sample stale before the next publication (issue 16).

        Actors sample with the last published weights. The steps after a publication are taken at versions
        v, v + 1, ...; at v + max_staleness + 1 everything the actors can have sampled lags by more than
        `max_staleness`, so it is all dropped as stale, no step is taken, and the publication due at
        v + publish_every never comes: the learner drops all work until `read_timeout_s`.
        """
        if self.publish_every > self.max_staleness + 1:
            raise ValueError(
                f"publish_every: {self.publish_every} is more than learner.max_staleness + 1 "
                f"({self.max_staleness + 1}), and from step {self.max_staleness + 1} after a publication every sample "
                "lags by more than learner.max_staleness and is dropped as stale, so the learner never reaches "
                "its next publication; lower learner.publish_every or raise learner.max_staleness")
        return self
