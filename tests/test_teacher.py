"""The meta-learned LM objective (Shen): reference checks of the update rules, the Two Moons codec
and a quick end-to-end study."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from metalm.cli import main
from metalm.teacher import objective as obj
from metalm.teacher import twomoons as tm
from metalm.teacher.model import ModelSize, teacher_and_student
from metalm.teacher.pretrain import METHODS, PretrainSettings, inverse_sqrt, masking_scheme, pretrain

V = tm.VOCAB


def _tiny(dtype=torch.float64, seed=0):
    size = ModelSize(V.size, n_layer=1, d_model=4, d_ff=8, n_head=2, dropout=0.0)
    teacher, student = teacher_and_student(size, seed=seed)
    return teacher.to(dtype), student.to(dtype)


def _batches(dtype=torch.float64):
    x_u = tm.unlabelled_sequences(2, noise=0.1, seed=0)  # (2, 34)
    data = tm.labelled_set(6, noise=0.1, seed=1)
    targets = data.targets()

    def lab(idx):
        keep = torch.ones(len(idx), 4, dtype=torch.bool)
        return {"tokens": data.inputs[idx], "keep": keep, "target": targets[idx], "weight": keep.to(dtype)}

    return x_u, x_u != V.pad, lab([0, 1, 2]), lab([3, 4, 5])


# --- data -----------------------------------------------------------------------------------

@pytest.mark.parametrize("noise", [None, 0.1])
def test_make_moons_equals_scikit_learn(noise):
    from sklearn.datasets import make_moons

    for seed, n in [(0, 100), (3, 37)]:
        ours, our_labels = tm.make_moons(n, noise=noise, seed=seed)
        theirs, their_labels = make_moons(n, noise=noise, random_state=seed)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(our_labels, their_labels)


def test_codec_round_trips_points_to_tokens_and_back():
    rng = np.random.default_rng(0)
    grid = rng.integers(0, tm.GRID, size=(50, tm.POINTS_PER_SEQUENCE, 2))
    for points in grid:
        ids = tm.encode_sequence(points)
        assert ids.shape == (34,) and ids[0] == V.cls_unlabelled and ids[-1] == V.sep
        back = tm.decode_sequence(ids)
        order = np.lexsort((points[:, 1], points[:, 0]))
        np.testing.assert_array_equal(back, points[order])  # the same points, sorted by (x, y)
        assert [tuple(p) for p in back] == sorted(tuple(p) for p in points)
    flat = grid.reshape(-1, 2)
    np.testing.assert_array_equal(tm.decode_points(tm.encode_points(flat)), flat)
    # every coordinate is one token; text names decode back to the numbers
    assert V.decode(tm.encode_points(flat[:1])[0]).split()[1:3] == [str(c) for c in flat[0]]
    raw, _ = tm.make_moons(2000, noise=0.1, seed=0)
    scaled = tm.to_grid(raw)
    assert scaled.min() >= 0 and scaled.max() < tm.GRID and scaled.dtype == np.int64
    np.testing.assert_array_equal(scaled, np.floor((raw - [-1.5, -1.0]) / [4.0, 2.5] * 64).clip(0, 63))
    seqs = tm.unlabelled_sequences(4, noise=0.1, seed=0)  # 64 moons points, 16 per sequence
    first = tm.to_grid(tm.make_moons(64, noise=0.1, seed=0)[0])[:16]
    np.testing.assert_array_equal(tm.decode_sequence(seqs[0]), first[np.lexsort((first[:, 1], first[:, 0]))])
    with pytest.raises(ValueError, match="non-coordinate"):
        tm.decode_sequence(np.array([V.cls_unlabelled, V.mask, 9, V.sep]))


def test_masking_follows_the_scheme():
    x_u = tm.unlabelled_sequences(400, noise=0.1, seed=0)
    batch = obj.mask_tokens(x_u, masking_scheme(), generator=torch.Generator().manual_seed(0))
    chosen = batch["weight"].bool()
    assert not chosen[:, 0].any() and not chosen[:, -1].any()  # never the task token or [SEP]
    assert (batch["tokens"][:, 0] == V.cls_mlm).all() and (batch["target"][:, 0] == V.cls_mlm).all()
    assert abs(chosen[:, 1:-1].float().mean().item() - 0.15) < 0.01
    masked = (batch["tokens"] == V.mask)[chosen].float().mean().item()
    assert abs(masked - 0.8) < 0.03
    assert torch.equal(batch["tokens"][~chosen], batch["target"][~chosen])


def test_inverse_sqrt_schedule_matches_section_4_1():
    # "for 10k warmup steps, the learning rate increases ... until the peak lr/100, and will later halve at 40k"
    peak = 0.08 / 100
    assert inverse_sqrt(10_000 - 1, peak_lr=peak, warmup=10_000) == pytest.approx(peak)
    assert inverse_sqrt(40_000 - 1, peak_lr=peak, warmup=10_000) == pytest.approx(peak / 2)
    assert inverse_sqrt(4_999, peak_lr=peak, warmup=10_000) == pytest.approx(peak / 2)


# --- hard labels ----------------------------------------------------------------------------

def _hand_h(student, pseudo, support, query, *, lr):
    """Eq. 1-2 and 8 with torch.optim.SGD on module copies and numpy."""
    s = copy.deepcopy(student)
    theta0 = np.concatenate([p.detach().numpy().ravel() for p in s.parameters()])
    opt = torch.optim.SGD(s.parameters(), lr=lr)
    grads = []
    for batch in (pseudo, support):
        opt.zero_grad()
        logits = s(batch["tokens"], batch["keep"])["output"]
        loss = F.cross_entropy(logits.transpose(1, 2), batch["target"], reduction="none")  # (B, T)
        loss = ((loss * batch["weight"]).sum(1) / batch["weight"].sum(1)).mean()
        loss.backward()
        grads.append(np.concatenate([p.grad.numpy().ravel() for p in s.parameters()]))
        opt.step()
        if batch is pseudo:
            theta1 = np.concatenate([p.detach().numpy().ravel() for p in s.parameters()])
    opt.zero_grad()
    logits = s(query["tokens"], query["keep"])["output"]
    F.cross_entropy(logits.transpose(1, 2), query["target"]).backward()
    g_query = np.concatenate([p.grad.numpy().ravel() for p in s.parameters()])
    step = theta0 - theta1
    cosine = g_query @ step / (np.linalg.norm(g_query) * np.linalg.norm(step))
    return cosine, lr * g_query @ grads[0], grads[0]


@pytest.mark.parametrize("h_form", ["cosine", "dot"])
def test_hard_label_h_and_teacher_gradient_match_a_hand_computation(h_form):
    check_hard_label_step(*_tiny(), h_form)


def check_hard_label_step(teacher, student, h_form: str) -> float:
    """``hard_label_step``'s h, student gradient and teacher gradient on one tiny batch against the
    hand computation (``_hand_h`` and the teacher's λ·h·∇ of its own sample's NLL); returns h.
    Shared with the Hugging Face encoders' test (tests/test_teacher_hf.py)."""
    x_u, keep, support, query = _batches()
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    out = obj.hard_label_step(teacher, student, t_params, s_params, x_u, keep, support, query, inner_lr=0.1,
                              meta_weight=3.0, h_form=h_form, generator=torch.Generator().manual_seed(0))
    cosine, dot, pre_grad = _hand_h(student, out.pseudo, support, query, lr=0.1)
    h = cosine if h_form == "cosine" else dot
    assert out.stats["h"] == pytest.approx(h, rel=1e-9, abs=1e-15)
    ours = np.concatenate([out.student_grads[n].numpy().ravel() for n, _ in student.named_parameters()])
    np.testing.assert_allclose(ours, pre_grad, rtol=1e-9, atol=1e-14)
    # teacher: λ·h·∇θT of the mean token NLL of its own sample (x̂, ŷ) (Eq. 6)
    t = copy.deepcopy(teacher)
    logits = t(x_u, keep)
    logp_x = logits["input"].log_softmax(-1).gather(-1, out.pseudo["tokens"][..., None]).squeeze(-1)  # (B, T)
    logp_y = logits["output"].log_softmax(-1).gather(-1, out.pseudo["target"][..., None]).squeeze(-1)
    (3.0 * h * -(logp_x.mean() + logp_y.mean()) / 2).backward()
    for name, p in t.named_parameters():
        torch.testing.assert_close(out.teacher_grads[name], p.grad, rtol=1e-9, atol=1e-14)
    return h


def _np(tensors):
    return np.concatenate([t.detach().numpy().ravel() for t in tensors])


def test_hard_label_h_uses_the_students_real_adamw_step():
    """Eq. 8 with an AdamW student: θ1 is θ0 minus a hand-written AdamW step (numpy, from the
    optimiser's moments), then one SGD support step; h is the numpy cosine of ∇L(θ2) and θ0 − θ1."""
    teacher, student = _tiny()
    x_u, keep, support, query = _batches()
    lr, wd, (b1, b2), eps = 0.03, 0.01, (0.9, 0.98), 1e-6
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=wd, betas=(b1, b2), eps=eps, foreach=False)
    torch.manual_seed(1)
    for p in student.parameters():  # a warm state: one earlier step with some gradient
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    out = obj.hard_label_step(teacher, student, t_params, s_params, x_u, keep, support, query, inner_lr=0.1,
                              generator=torch.Generator().manual_seed(0),
                              pre_update=lambda grads: obj.adamw_update(s_params, grads, opt))
    assert all(float(opt.state[p]["step"]) == 1 for p in student.parameters())  # state left as it was
    s = copy.deepcopy(student)
    logits = s(out.pseudo["tokens"], out.pseudo["keep"])["output"]
    nll = F.cross_entropy(logits.transpose(1, 2), out.pseudo["target"], reduction="none")  # (B, T)
    ((nll * out.pseudo["weight"]).sum(1) / out.pseudo["weight"].sum(1)).mean().backward()
    theta0, g = _np(s.parameters()), _np(p.grad for p in s.parameters())
    m = b1 * _np(opt.state[p]["exp_avg"] for p in student.parameters()) + (1 - b1) * g
    v = b2 * _np(opt.state[p]["exp_avg_sq"] for p in student.parameters()) + (1 - b2) * g * g
    step = lr * wd * theta0 + lr / (1 - b1 ** 2) * m / (np.sqrt(v / (1 - b2 ** 2)) + eps)  # t = 2
    assert np.abs(step - 0.1 * g).max() > 1e-3  # the test can tell the AdamW step from the SGD one
    with torch.no_grad():
        offset = 0
        for p in s.parameters():
            p.copy_(torch.from_numpy(theta0[offset:offset + p.numel()] - step[offset:offset + p.numel()])
                    .reshape(p.shape))
            offset += p.numel()
    sgd = torch.optim.SGD(s.parameters(), lr=0.1)
    sgd.zero_grad()
    logits = s(support["tokens"], support["keep"])["output"]
    nll = F.cross_entropy(logits.transpose(1, 2), support["target"], reduction="none")
    ((nll * support["weight"]).sum(1) / support["weight"].sum(1)).mean().backward()
    sgd.step()
    sgd.zero_grad()
    F.cross_entropy(s(query["tokens"], query["keep"])["output"].transpose(1, 2), query["target"]).backward()
    g_query = _np(p.grad for p in s.parameters())
    cosine = g_query @ step / (np.linalg.norm(g_query) * np.linalg.norm(step))
    assert out.stats["h"] == pytest.approx(cosine, rel=1e-7, abs=1e-12)


def test_adamw_update_matches_the_delta_of_a_real_step():
    _, student = _tiny()
    opt = torch.optim.AdamW(student.parameters(), lr=0.02, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    named = dict(student.named_parameters())
    for k in range(2):  # from an empty state, then from a warm one
        grads = {n: torch.randn_like(p) for n, p in named.items()}
        ours = obj.adamw_update(named, grads, opt)
        before = {n: p.detach().clone() for n, p in named.items()}
        for n, p in named.items():
            p.grad = grads[n]
        opt.step()
        for n, p in named.items():
            torch.testing.assert_close(ours[n], before[n] - p.detach(), rtol=1e-9, atol=1e-14)


def test_h_update_is_validated():
    from metalm.config import ConfigError
    with pytest.raises(ConfigError, match="h_update"):
        PretrainSettings("hard", samples=16, h_update="adam")


def test_finetune_batch_sizes_follow_table_6():
    from metalm.teacher.finetune import FINETUNE_BATCH, finetune_batch_size
    assert FINETUNE_BATCH == {10: 1, 20: 2, 40: 4, 80: 8, 160: 16}
    assert [finetune_batch_size(n) for n in (10, 20, 40, 80, 160)] == [1, 2, 4, 8, 16]
    assert finetune_batch_size(5) == 1 and finetune_batch_size(320) == 16  # between and beyond: n/10 in [1, 16]


def test_hard_label_step_skips_the_teacher_when_h_is_not_finite():
    teacher, student = _tiny()
    x_u, keep, support, query = _batches()
    query = dict(query, target=F.one_hot(query["target"], V.size).double() * float("nan"))  # a NaN query loss
    out = obj.hard_label_step(teacher, student, dict(teacher.named_parameters()), dict(student.named_parameters()),
                              x_u, keep, support, query)
    assert out.teacher_grads is None and out.stats["skipped"] == 1.0
    assert all(torch.isfinite(g).all() for g in out.student_grads.values())  # the student still learns


# --- soft labels ----------------------------------------------------------------------------

@pytest.mark.parametrize("fixed_y", [False, True])
def test_soft_label_teacher_gradient_matches_finite_differences(fixed_y):
    teacher, student = _tiny()
    x_u, keep, support, query = _batches()
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    out = obj.soft_label_step(teacher, student, t_params, s_params, x_u, keep, support, query,
                              inner_lr=0.1, meta_weight=1.0, fixed_y=fixed_y)
    g = torch.Generator().manual_seed(1)
    direction = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in t_params.items()}
    analytic = sum((out.teacher_grads[n] * direction[n]).sum() for n in t_params).item()

    def loss_at(eps):
        shifted = {n: (p + eps * direction[n]).detach() for n, p in t_params.items()}
        return obj.soft_meta_loss(teacher, student, shifted, s_params, x_u, keep, support, query,
                                  inner_lr=0.1, fixed_y=fixed_y)[0].item()

    eps = 1e-5
    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert abs(analytic) > 1e-6  # the check has something to compare
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-10)


def test_fixed_y_really_fixes_y_hat():
    x_u, keep, support, query = _batches()
    teacher, student = _tiny()
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    with torch.no_grad():  # a teacher whose output head would write something else entirely
        teacher.heads["output"].bias[V.label1] = 50.0
    for step in (obj.hard_label_step, obj.soft_label_step):
        out = step(teacher, student, t_params, s_params, x_u, keep, support, query, fixed_y=True)
        target = out.pseudo["target"]
        expected = x_u if target.dtype == torch.int64 else F.one_hot(x_u, V.size).to(target.dtype)
        assert torch.equal(target, expected)
        for name in ("heads.output.weight", "heads.output.bias"):  # no meta gradient reaches the ŷ head
            assert torch.count_nonzero(out.teacher_grads[name]) == 0
        free = step(teacher, student, t_params, s_params, x_u, keep, support, query, fixed_y=False)
        assert not torch.equal(free.pseudo["target"], expected)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_pretrains_with_finite_losses(method):
    torch.manual_seed(0)
    teacher, student = teacher_and_student(ModelSize(V.size), seed=0)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    unlabelled = tm.unlabelled_sequences(32, noise=0.1, seed=0)
    held = obj.mask_tokens(unlabelled[:8], masking_scheme(), generator=torch.Generator().manual_seed(0))
    labelled = tm.labelled_set(10, noise=0.1, seed=1)
    out = pretrain(PretrainSettings(method, samples=32, warmup=1), teacher, student, unlabelled,
                   [(labelled.inputs, labelled.targets())], held, seed=0)
    assert out["steps"] == 2 and np.isfinite(out["curve"][-1]["mlm_loss"])
    assert any(not torch.equal(before[n], p) for n, p in student.named_parameters())


# Pins of pretrain() at a tiny size: 3 optimizer steps of 2 micro-batches (batch 4, 2 examples per
# task, warmup 2), float64, dropout 0.1 from torch.manual_seed(0). Recorded from the code before
# Shen's step moved onto the shared optimiser groups (commit d2e65bd, the own loop with ``_apply``),
# by printing ``_pinned_run(method)`` with OMP_NUM_THREADS=1. Each model gives (sum, sum of squares,
# index-weighted sum) of all its parameter values, taken with math.fsum in parameter order; the curve
# gives the held-out MLM loss after each step; ``h`` the hard-label feedback of every micro-batch.
# The mlm baseline never trains the teacher, so its teacher numbers are the initial weights'.
PINS = {
    'mlm': {"student": (11.484914279920654, 12.317589265218365, 5661.051897366394),
            "teacher": (11.871893777533842, 12.447551053443657, 5956.767921214283),
            "mlm_loss": [4.276675258465564, 4.272002288665043, 4.270712910095405],
            "h": []},
    'hard': {"student": (11.359301931739376, 12.292382992834463, 5715.217487705847),
             "teacher": (11.784813707961344, 12.460386867883551, 5803.949423111733),
             "mlm_loss": [4.275020010760305, 4.2734777998441205, 4.272686781722932],
             "h": [-0.010060694664356159, 0.0424871613776347, -0.003175745968058235, 0.04110720510000989,
                   0.07124368742437354, -0.03300245798904479]},
    'soft': {"student": (11.662171060267891, 12.200796886733293, 5771.942250003648),
             "teacher": (11.774447155978194, 12.498888770378732, 5887.847764120924),
             "mlm_loss": [4.281122272010399, 4.277825458052737, 4.276942650865723],
             "h": []},
    'soft_fixed_y': {"student": (11.22870624654045, 12.362880081719652, 5643.235838497325),
                     "teacher": (11.611721122059048, 12.488505826037514, 5745.131460721212),
                     "mlm_loss": [4.275734377536262, 4.271330097629528, 4.269610780980579],
                     "h": []},
    'hard_fixed_y': {"student": (11.495441165375022, 12.317936182588898, 5775.06631789727),
                     "teacher": (11.644224164761006, 12.462426914132731, 5733.689283573071),
                     "mlm_loss": [4.276840825061761, 4.273620158126877, 4.272145898605164],
                     "h": [-0.026744689558386162, -0.06708764396711053, -0.0406943417688873, -0.03588719222422593,
                           -0.002460661713194959, -0.005789390103102875]},
}


# The pins were recorded bit for bit on one CPU; another CPU's float64 kernels (AVX-512 against
# AVX2, seen on an AMD EPYC) round the last bit differently (relative differences of ~1e-16), so the
# pins hold to 1e-12, far below any change of the method (which moves them by 1e-3 or more).
PIN_RTOL = 1e-12


def _fingerprint(model) -> tuple[float, float, float]:
    import math
    values = [v for p in model.parameters() for v in p.detach().flatten().tolist()]
    return (math.fsum(values), math.fsum(v * v for v in values), math.fsum(i * v for i, v in enumerate(values)))


def _pinned_run(method, samples=24, streams="shared", **kwargs):
    torch.manual_seed(0)
    size = ModelSize(V.size, n_layer=1, d_model=4, d_ff=8, n_head=2)  # dropout 0.1
    teacher, student = teacher_and_student(size, seed=0)
    teacher, student = teacher.double(), student.double()
    unlabelled = tm.unlabelled_sequences(16, noise=0.1, seed=0)
    held = obj.mask_tokens(unlabelled[:4], masking_scheme(), generator=torch.Generator().manual_seed(0))
    labelled = tm.labelled_set(8, noise=0.1, seed=1)
    settings = PretrainSettings(method, samples=samples, batch_size=4, samples_per_task=2, grad_accum=2, warmup=2,
                                streams=streams)
    out = pretrain(settings, teacher, student, unlabelled, [(labelled.inputs, labelled.targets())], held, seed=0,
                   **kwargs)
    return teacher, student, out


@pytest.mark.parametrize("method", METHODS)
def test_pretrain_keeps_its_pinned_outcome(method):
    teacher, student, out = _pinned_run(method)
    pin = PINS[method]
    assert out["steps"] == 3
    assert _fingerprint(student) == pytest.approx(pin["student"], rel=PIN_RTOL)
    assert _fingerprint(teacher) == pytest.approx(pin["teacher"], rel=PIN_RTOL)
    assert [c["mlm_loss"] for c in out["curve"]] == pytest.approx(pin["mlm_loss"], rel=PIN_RTOL)
    assert out["h"] == pytest.approx(pin["h"], rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("kind", ["mlm", "hard", "soft"])
def test_teacher_student_step_writes_grads_that_add_up(kind):
    from metalm.contracts import Episode
    from metalm.teacher.algorithm import TeacherAndStudent, TeacherStudentStep, unlabelled_batch

    teacher, student = _tiny()
    pair = TeacherAndStudent(teacher, student)
    x_u, _, support, query = _batches()
    episode = Episode(task="t", support=(unlabelled_batch(x_u), support), query=query)

    def grads(calls):
        pair.zero_grad(set_to_none=True)
        algorithm = TeacherStudentStep(kind, masking_scheme(), torch.Generator().manual_seed(0), meta_weight=1.0)
        for _ in range(calls):
            algorithm.generator.manual_seed(0)  # the same draws each call
            stats = algorithm.step(pair, [episode])
            assert np.isfinite(stats["loss"])
        return {n: None if p.grad is None else p.grad.clone() for n, p in pair.named_parameters()}

    once, twice = grads(1), grads(2)
    assert any(g is not None for n, g in once.items() if n.startswith("student."))
    assert any(g is not None for n, g in once.items() if n.startswith("teacher.")) == (kind != "mlm")
    for name, g in once.items():
        if g is not None:
            torch.testing.assert_close(twice[name], 2 * g, rtol=1e-12, atol=1e-15)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("method", METHODS)
def test_pretrain_killed_mid_run_resumes_bit_for_bit(method, tmp_path):
    # 6 optimizer steps, checkpoints every 2; killed after step 5, so steps 5 is redone from step 4's
    # checkpoint (the optimisers, schedules, the pre-training generator, dropout's RNG, the curve).
    teacher, student, straight = _pinned_run(method, samples=48, run_dir=tmp_path / "straight", checkpoint_every=2)

    def kill_at_5(done):
        if done == 5:
            raise _Killed

    with pytest.raises(_Killed):
        _pinned_run(method, samples=48, run_dir=tmp_path / "killed", checkpoint_every=2, on_step=kill_at_5)
    torch.manual_seed(123)  # the resumed process's RNG is whatever it is: the checkpoint restores it
    seen = []
    t2, s2, resumed = _pinned_run(method, samples=48, run_dir=tmp_path / "killed", checkpoint_every=2, resume=True,
                                  on_step=seen.append)
    assert seen == [5, 6]  # it resumed from step 4's checkpoint, not from the start
    for a, b in ((teacher, t2), (student, s2)):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), name
    assert resumed["curve"] == straight["curve"] and len(straight["curve"]) == 6
    assert resumed["h"] == straight["h"] and resumed["skipped"] == straight["skipped"]
    assert resumed["best_mlm_loss"] == straight["best_mlm_loss"]
    assert all(torch.equal(resumed["best_state"][k], v) for k, v in straight["best_state"].items())


# finetune() at a tiny size (one epoch of 4 steps across the warmup), float64, dropout 0.1 seeded by
# finetune itself; recorded from the code before it moved onto OptimGroup (commit d5da819, with
# ``_apply``), printed with OMP_NUM_THREADS=1, as PINS above.
FINETUNE_PIN = (-1.9101769069392116, 17.040891914547608, -6433.852955543558)


def test_finetune_keeps_its_pinned_outcome():
    from metalm.teacher.finetune import finetune

    _, student = teacher_and_student(ModelSize(V.size, n_layer=1, d_model=4, d_ff=8, n_head=2), seed=0)
    student = student.double()
    out = finetune(student, tm.labelled_set(8, noise=0.1, seed=1), tm.labelled_set(8, noise=0.1, seed=2), epochs=1,
                   batch_size=2, warmup=3, peak_lr=0.05)
    assert out == {"val_accuracy": 0.5, "best_epoch": 1, "val_curve": [0.5]}
    assert _fingerprint(student) == pytest.approx(FINETUNE_PIN, rel=PIN_RTOL)


# --- the study ------------------------------------------------------------------------------

def test_twomoons_quick_study_end_to_end_and_resumes(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["twomoons", "--quick", "--out", str(out), "--workers", "1"]) == 0
    first = capsys.readouterr().out
    assert "0 of 7 runs already done" in first
    runs = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert len(runs) == 10  # 5 rows x 2 set sizes x 1 seed
    for name in ("results.md", "results.json", "regions.png", "accuracy.png", "mlm_curve.png"):
        assert (out / name).stat().st_size > 0
    text = (out / "results.md").read_text()
    for row in ("MLM (latest)", "MLM (best MLM loss)", "Hard", "Soft", "Soft (fixed y)"):
        assert f"| {row} |" in text
    assert "(61.4)" in text and "(75.1)" in text and "64 pre-training samples" in text  # paper's beside ours
    result = json.loads((out / "runs" / "hard-n10-s0.json").read_text())
    assert len(result["grid"]) == 64 * 64 and set(result["grid"]) <= {"0", "1"}
    assert 0.0 <= result["test_accuracy"] <= 1.0 and len(result["teacher_samples"]) == 3
    assert main(["twomoons", "--quick", "--out", str(out), "--workers", "1"]) == 0
    assert "7 of 7 runs already done; running 0" in capsys.readouterr().out


def test_lmtext_quick_runs_mlm_and_soft_labels_and_logs_the_teacher(tmp_path, data_root, capsys):
    corpus = tmp_path / "corpus.txt"  # a slice of the real corpus keeps the test short
    lines = (data_root / "corpus" / "lee_background.cor").read_text(encoding="utf-8").splitlines()
    corpus.write_text("\n".join(lines[:40]), encoding="utf-8")
    out = tmp_path / "text"
    assert main(["lmtext", "--quick", "--data", str(data_root), "--corpus", str(corpus), "--out", str(out)]) == 0
    soft = json.loads((out / "runs" / "soft.json").read_text())
    assert set(soft["scores"]) == {"sst2", "subj"}
    assert all(0.0 <= s["accuracy"] <= 1.0 for s in soft["scores"].values())
    logged = soft["teacher_samples"]
    assert [e["step"] for e in logged] == [1, 2] and logged[0]["samples"][0]["x_u"].startswith("[CLS0]")
    text = (out / "results.md").read_text()
    assert "| mlm |" in text and "| soft |" in text and "soft teacher after 2 optimizer steps" in text


def test_lmtext_takes_any_registered_classification_task_and_keeps_a_folder_to_its_tasks(tmp_path, capsys):
    """Without a data folder: the gensim demo corpus and two registered tasks that need no files
    (polarity ships with gensim; twomoons is generated), one with two labels per task token."""
    from metalm.tasks.spec import gensim_data_dir
    corpus = tmp_path / "corpus.txt"
    lines = (gensim_data_dir() / "lee_background.cor").read_text(encoding="utf-8").splitlines()
    corpus.write_text("\n".join(lines[:40]), encoding="utf-8")
    out = tmp_path / "text"
    argv = ["lmtext", "--quick", "--data", str(tmp_path / "no-data"), "--corpus", str(corpus), "--out", str(out)]
    assert main(argv + ["--tasks", "polarity,twomoons"]) == 0
    soft = json.loads((out / "runs" / "soft.json").read_text())
    assert soft["tasks"] == ["polarity", "twomoons"] and set(soft["scores"]) == {"polarity", "twomoons"}
    assert "| method | polarity acc | twomoons acc |" in (out / "results.md").read_text()
    capsys.readouterr()
    assert main(argv + ["--tasks", "polarity"]) == 2  # the folder holds results of other tasks
    assert "made with tasks ['polarity', 'twomoons'], not ['polarity']" in capsys.readouterr().err
    assert main(argv[:-1] + [str(tmp_path / "other"), "--tasks", "simlex"]) == 2
    assert "task simlex is regression" in capsys.readouterr().err


def test_mlm_curve_plot_is_written_from_stored_run_logs(tmp_path):
    from metalm.teacher.pictures import mlm_curves, plot_mlm_curve
    curve = lambda losses: [{"step": i + 1, "samples": 16 * (i + 1), "mlm_loss": v} for i, v in enumerate(losses)]  # noqa: E731
    runs = [{"method": "mlm_latest", "n": 10, "seed": 0, "mlm_curve": curve([3.0, 2.0])},
            {"method": "mlm_best", "n": 10, "seed": 0, "mlm_curve": curve([3.0, 2.0])},  # same pre-training
            {"method": "mlm_latest", "n": 20, "seed": 0, "mlm_curve": curve([3.0, 2.0])},
            {"method": "mlm_latest", "n": 10, "seed": 1, "mlm_curve": curve([4.0, 1.0])},
            {"method": "hard", "n": 10, "seed": 0, "mlm_curve": curve([5.0, 4.5])}]
    for i, r in enumerate(runs):
        (tmp_path / f"{i}.json").write_text(json.dumps(r))
    stored = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json"))]
    got = mlm_curves(stored)
    assert got == {"mlm": ([16, 32], [3.5, 1.5], 2), "hard": ([16, 32], [5.0, 4.5], 1)}
    plot_mlm_curve(stored, tmp_path / "mlm_curve.png", title="t")
    assert (tmp_path / "mlm_curve.png").read_bytes()[:4] == b"\x89PNG"
