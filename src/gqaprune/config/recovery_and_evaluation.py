"""The params sections of recovery and evaluation: LoRA / distillation settings, what the evaluate stages measure.

Part of the params schema (:mod:`gqaprune.config.sections` lists every section); split out so that each
file stays short. Torch-free.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from gqaprune.config import choices as C
from gqaprune.config.corpora import evaluation_corpora, instruction_corpora
from gqaprune.config.rules import Section, choice, is_int, is_num, mix_rule, rule


@dataclass(frozen=True)
class FinetuneConfig(Section):
    """LoRA recovery settings (the ``finetune`` section of params.yaml).

    Attributes:
        r: LoRA rank.
        alpha: LoRA alpha; the update is scaled by ``alpha / r``.
        dropout: dropout on the LoRA branch input, in [0, 1).
        lr: peak learning rate of AdamW.
        epochs: passes over the records (fractions allowed: 0.5 = half an epoch of batches).
        max_steps: optional cap on optimizer steps (training stops after that many, whatever ``epochs``).
        batch_size: examples per micro-batch.
        grad_accum: micro-batches per optimizer step.
        max_length: tokens per example after truncation (prompt + response + EOS).
        n_records: use only the first N records (None: all).
        seed: seeds LoRA initialisation, dropout and the shuffling.
        gradient_checkpointing: recompute decoder-layer activations in the backward pass (less memory).
        target_modules: names (suffixes) of the Linear layers that get LoRA; those a pruned layer lost
            are simply skipped in that layer.
        warmup_steps: optimizer steps of linear warm-up from 0 to ``lr``.
    """

    section: ClassVar[str] = "finetune"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    lr: float = 3e-4
    epochs: float = 1.0
    max_steps: int | None = 10
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 128
    n_records: int | None = None
    seed: int = 0
    gradient_checkpointing: bool = False
    target_modules: tuple[str, ...] = C.DEFAULT_TARGET_MODULES
    warmup_steps: int = 0

    def rules(self):
        k = self.key
        return [
            rule(is_int(self.r) and self.r >= 1, k("r"), "an integer >= 1", self.r),
            rule(is_num(self.alpha) and self.alpha > 0, k("alpha"), "a number > 0", self.alpha),
            rule(is_num(self.dropout) and 0 <= self.dropout < 1, k("dropout"), "a number in [0, 1)", self.dropout),
            rule(is_num(self.lr) and self.lr > 0, k("lr"), "a number > 0", self.lr),
            rule(is_num(self.epochs) and self.epochs > 0, k("epochs"), "a number > 0", self.epochs),
            rule(self.max_steps is None or (is_int(self.max_steps) and self.max_steps >= 1), k("max_steps"),
                  "null or an integer >= 1", self.max_steps),
            rule(is_int(self.batch_size) and self.batch_size >= 1, k("batch_size"), "an integer >= 1",
                  self.batch_size),
            rule(is_int(self.grad_accum) and self.grad_accum >= 1, k("grad_accum"), "an integer >= 1",
                  self.grad_accum),
            rule(is_int(self.max_length) and self.max_length >= 2, k("max_length"), "an integer >= 2",
                  self.max_length),
            rule(self.n_records is None or (is_int(self.n_records) and self.n_records >= 1), k("n_records"),
                  "null or an integer >= 1", self.n_records),
            rule(is_int(self.seed) and self.seed >= 0, k("seed"), "an integer >= 0", self.seed),
            rule(isinstance(self.gradient_checkpointing, bool), k("gradient_checkpointing"), "true or false",
                  self.gradient_checkpointing),
            rule(isinstance(self.target_modules, tuple | list) and len(self.target_modules) > 0
                  and all(isinstance(t, str) and t for t in self.target_modules), k("target_modules"),
                  "a non-empty list of module names", self.target_modules),
            rule(is_int(self.warmup_steps) and self.warmup_steps >= 0, k("warmup_steps"), "an integer >= 0",
                  self.warmup_steps),
        ]


@dataclass(frozen=True)
class FinetuneParams(FinetuneConfig):
    """Recovery of the pruned model, and where and whether to run it.

    ``method``: ``lora`` (LoRA, the settings of :class:`FinetuneConfig`, on the training records of the
    instruction corpus ``dataset`` rendered as the model sees them; runs on N processes) or ``distill``
    (train the pruned model towards the dense model's next-token distributions, KL on the logits, on
    windows of the calibration splits of the corpora of ``mix`` drawn by weight, never a held-out
    window; ``distill_mode`` ``full`` trains every weight, ``lora`` adapters; ``max_steps`` and/or
    ``distill_max_seconds`` bound it; one process). ``mix``: ``{corpus: weight}`` or ``auto`` (the
    calibration mix).
    """

    enabled: bool = True
    method: str = "lora"
    merge: bool = True
    distill_mode: str = "full"
    distill_lr: float = 2e-4
    distill_batch_size: int = 8
    distill_max_seconds: float | None = None
    mix: str | dict[str, float] = "auto"
    dtype: str = "float32"
    device: str = "auto"

    def rules(self):
        return [*super().rules(), choice(self.method, C.RECOVERY_METHODS, self.key("method")),
                choice(self.distill_mode, C.DISTILL_MODES, self.key("distill_mode")),
                rule(is_num(self.distill_lr) and self.distill_lr > 0, self.key("distill_lr"), "a number > 0",
                      self.distill_lr),
                rule(self.distill_batch_size >= 1, self.key("distill_batch_size"), ">= 1", self.distill_batch_size),
                rule(self.distill_max_seconds is None or self.distill_max_seconds > 0,
                      self.key("distill_max_seconds"), "null or > 0", self.distill_max_seconds),
                mix_rule(self.mix, self.key("mix")),
                choice(self.dtype, C.DTYPES, self.key("dtype"))]

    def config(self) -> FinetuneConfig:
        """The library config (the training settings, without pipeline-only keys)."""
        names = {f.name for f in dataclasses.fields(FinetuneConfig)}
        return FinetuneConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


@dataclass(frozen=True)
class EvaluateParams(Section):
    """What the evaluate stages measure, on the dense model and on the pruned (and recovered) one.

    Perplexity: non-overlapping ``seq_len`` windows of each of ``datasets``; ``max_tokens`` caps the
    evaluated tokens per corpus (null: all), spread evenly over the whole test split with ``spread``
    (the standard error of each log-perplexity is reported next to it).
    Tasks (lm-eval-harness): ``tasks`` lists task names or suites (``zeroshot7``); a task needs the
    Hugging Face hub unless its YAML and data are local (``task_include_path``, a folder relative to
    params.yaml); ``task_limit`` documents per task (null: all); ``task_num_fewshot`` examples.
    Code: greedy pass@1 on the first ``humaneval_problems`` HumanEval problems (0: off), each completion
    (at most ``humaneval_max_new_tokens``) run in a sandbox: its own process with ``sandbox_timeout_s``
    of wall and CPU time, ``sandbox_memory_mb`` of memory, a fresh temporary folder and no network
    (``sandbox_network: require`` refuses to run where no network namespace can be had; ``warn`` runs
    with a warning).
    Instructions: mean NLL of the reference answers of ``instruction_records`` held-out records of
    ``instruction_dataset`` (records no calibration or recovery reads) under the model's chat template,
    at most ``instruction_max_length`` tokens each (0 records: off).
    Generation: greedy continuations of the fixed prompt set, ``generation_max_new_tokens`` new tokens
    each (0: off): loop rate, distinct-n, agreement with the dense model's continuations.
    """

    section: ClassVar[str] = "evaluate"
    datasets: list[str] = field(default_factory=lambda: ["wikitext2", "ptb", "c4"])
    seq_len: int = 128
    max_tokens: int | None = 4096
    spread: bool = True
    tasks: list[str] = field(default_factory=list)
    task_include_path: str | None = None
    task_limit: int | None = None
    task_num_fewshot: int = 0
    humaneval_problems: int = 10
    humaneval_max_new_tokens: int = 256
    sandbox_timeout_s: float = 10.0
    sandbox_memory_mb: int = 1024
    sandbox_network: str = "require"
    instruction_dataset: str = "alpaca"
    instruction_records: int = 64
    instruction_max_length: int = 256
    generation_max_new_tokens: int = 128
    batch_size: int = 8
    dtype: str = "float32"
    device: str = "auto"

    def rules(self):
        bad = [d for d in self.datasets if d not in evaluation_corpora()]
        k = self.key
        return [rule(bool(self.datasets) and not bad, k("datasets"),
                     f"a non-empty list of {evaluation_corpora()}", self.datasets),
                rule(self.seq_len >= 2, k("seq_len"), ">= 2", self.seq_len),
                rule(self.max_tokens is None or self.max_tokens >= self.seq_len, k("max_tokens"),
                     "null or >= evaluate.seq_len", self.max_tokens),
                rule(self.task_limit is None or self.task_limit >= 1, k("task_limit"), "null or >= 1",
                     self.task_limit),
                rule(self.task_num_fewshot >= 0, k("task_num_fewshot"), ">= 0", self.task_num_fewshot),
                rule(0 <= self.humaneval_problems <= 164, k("humaneval_problems"), "in 0..164 (0: off)",
                     self.humaneval_problems),
                rule(self.humaneval_max_new_tokens >= 1, k("humaneval_max_new_tokens"), ">= 1",
                     self.humaneval_max_new_tokens),
                rule(is_num(self.sandbox_timeout_s) and self.sandbox_timeout_s > 0, k("sandbox_timeout_s"),
                     "a number > 0", self.sandbox_timeout_s),
                rule(self.sandbox_memory_mb >= 64, k("sandbox_memory_mb"), ">= 64", self.sandbox_memory_mb),
                choice(self.sandbox_network, ("require", "warn"), k("sandbox_network")),
                choice(self.instruction_dataset, instruction_corpora(), k("instruction_dataset")),
                rule(self.instruction_records >= 0, k("instruction_records"), ">= 0 (0: off)",
                     self.instruction_records),
                rule(self.instruction_max_length >= 2, k("instruction_max_length"), ">= 2",
                     self.instruction_max_length),
                rule(self.generation_max_new_tokens >= 0, k("generation_max_new_tokens"), ">= 0 (0: off)",
                     self.generation_max_new_tokens),
                rule(self.batch_size >= 1, k("batch_size"), ">= 1", self.batch_size),
                choice(self.dtype, C.DTYPES, k("dtype"))]
