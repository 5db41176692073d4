"""Shen's steps on tiny random Hugging Face BERTs through ``teacher.hf.hf_encoder``, float64, against
the same references as the from-scratch encoder (``tests/test_teacher.py``)."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import transformers

from metalm.teacher import objective as obj
from metalm.teacher import twomoons as tm
from metalm.teacher.hf import hf_teacher_and_student
from metalm.teacher.pretrain import masking_scheme
from tests.test_teacher import _batches, check_hard_label_step

V = tm.VOCAB


def _bert(seed):
    config = transformers.BertConfig(vocab_size=V.size, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=40, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, initializer_range=0.2, pad_token_id=V.pad)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return transformers.BertForMaskedLM(config).double()


def _pair():
    return hf_teacher_and_student(_bert(0), _bert(1))


def test_adapter_equals_the_hf_model_and_one_hot_equals_ids():
    teacher, _ = _pair()
    x_u, keep, _, _ = _batches()
    keep = keep.clone()
    keep[1, 30:] = False
    ours = teacher(x_u, keep)
    hf = teacher.model(input_ids=x_u, attention_mask=keep.long(), output_hidden_states=True)
    torch.testing.assert_close(ours["output"], hf.logits, rtol=0, atol=0)
    head = teacher.heads["input"]
    torch.testing.assert_close(ours["input"], hf.hidden_states[-1] @ head.weight.T + head.bias, rtol=1e-12, atol=1e-14)
    soft = teacher(torch.nn.functional.one_hot(x_u, V.size).double(), keep)
    for name in ("input", "output"):
        torch.testing.assert_close(soft[name], ours[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("h_form", ["cosine", "dot"])
def test_hard_label_h_and_teacher_gradient_on_hf_bert_match_a_hand_computation(h_form):
    h = check_hard_label_step(*_pair(), h_form)  # the from-scratch encoder's reference check, on HF BERTs
    assert abs(h) > 1e-8


def test_soft_label_teacher_gradient_on_hf_bert_matches_finite_differences():
    teacher, student = _pair()
    x_u, keep, support, query = _batches()
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    out = obj.soft_label_step(teacher, student, t_params, s_params, x_u, keep, support, query,
                              inner_lr=0.1, meta_weight=1.0)
    g = torch.Generator().manual_seed(1)
    direction = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in t_params.items()}
    analytic = sum((out.teacher_grads[n] * direction[n]).sum() for n in t_params).item()

    def loss_at(eps):
        shifted = {n: (p + eps * direction[n]).detach() for n, p in t_params.items()}
        return obj.soft_meta_loss(teacher, student, shifted, s_params, x_u, keep, support, query,
                                  inner_lr=0.1)[0].item()

    eps = 1e-5
    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert abs(analytic) > 1e-6
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-10)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_teacher_student_step_on_hf_berts_writes_the_objectives_gradients(kind):
    from metalm.contracts import Episode
    from metalm.teacher.algorithm import TeacherAndStudent, TeacherStudentStep, unlabelled_batch

    teacher, student = _pair()
    pair = TeacherAndStudent(teacher, student)
    x_u, keep, support, query = _batches()
    episode = Episode(task="t", support=(unlabelled_batch(x_u), support), query=query)
    algorithm = TeacherStudentStep(kind, masking_scheme(), torch.Generator().manual_seed(0), meta_weight=1.0)
    assert np.isfinite(algorithm.step(pair, [episode])["loss"])
    # the reference: the objective's functions called directly with the same draws
    g = torch.Generator().manual_seed(0)
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    if kind == "hard":
        out = obj.hard_label_step(teacher, student, t_params, s_params, x_u, keep, support, query, generator=g)
    else:
        out = obj.soft_label_step(teacher, student, t_params, s_params, x_u, keep, support, query, meta_weight=1.0)
    aux = obj.teacher_aux_loss(teacher, t_params, x_u, keep, obj.mask_tokens(x_u, masking_scheme(), generator=g))
    aux_grads = dict(zip(t_params, torch.autograd.grad(aux, list(t_params.values()))))
    for name, p in t_params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, out.teacher_grads[name] + aux_grads[name], rtol=1e-10, atol=1e-14)
    for name, p in s_params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, out.student_grads[name], rtol=1e-10, atol=1e-14)
