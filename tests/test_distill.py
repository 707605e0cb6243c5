"""Distillation recovery on tiny random models: the student moves towards the teacher."""

import copy

import pytest
import torch

from gqaprune.models.random_models import build_model
from gqaprune.models.units import LayerKeep
from gqaprune.pruning.allocation import dense_reference, heldout_criteria
from gqaprune.pruning.surgery import prune_model
from gqaprune.recovery.distill import DistillConfig, distill, distillation_loss

WINDOWS = torch.randint(0, 128, (32, 16), generator=torch.Generator().manual_seed(7))


def _student(teacher):
    student = copy.deepcopy(teacher)
    prune_model(student, {i: LayerKeep(attn=[1], mlp=list(range(0, 96, 4))) for i in range(3)})
    return student


def test_loss_is_zero_for_the_teacher_and_positive_otherwise():
    teacher = build_model("tiny-llama-gqa4")
    h = torch.randn(10, 64)
    head = teacher.lm_head
    assert distillation_loss(h, h, head, head).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(h + 0.5 * torch.randn_like(h), h, head, head).item() > 1e-3


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_distillation_lowers_kl_to_the_teacher_and_leaves_the_teacher(mode):
    teacher = build_model("tiny-llama-gqa4")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = _student(teacher)
    ref = dense_reference(teacher, WINDOWS[:8])
    kl0 = heldout_criteria(student, ref)["kl"]
    emb0 = student.model.embed_tokens.weight.clone()
    losses = []
    cfg = DistillConfig(mode=mode, lr=3e-3 if mode == "lora" else 1e-3, max_steps=30, max_seconds=None, batch_size=4,
                        warmup_steps=2)
    student = distill(student, teacher, WINDOWS[8:], cfg, log=lambda s, loss, lr, t: losses.append(loss))
    assert len(losses) == 30
    kl1 = heldout_criteria(student, ref)["kl"]
    assert kl1 < 0.8 * kl0
    assert torch.equal(student.model.embed_tokens.weight, emb0)  # embeddings stay frozen
    assert type(student).__name__.endswith("ForCausalLM")  # LoRA merged back into a plain model
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_time_budget_stops_training():
    teacher = build_model("tiny-llama-gqa3")
    student = copy.deepcopy(teacher)
    steps = []
    distill(student, teacher, WINDOWS, DistillConfig(max_seconds=0.5, batch_size=2, warmup_steps=1),
            log=lambda s, loss, lr, t: steps.append(t))
    assert steps and steps[-1] < 5.0
