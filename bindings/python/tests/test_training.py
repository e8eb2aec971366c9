"""A real distillation on stories260K through the binding, checked against
examples/distill.c's printed output for the same seed and steps."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import qkd
from conftest import SOURCE

STEPS = "12"  # prints steps 1, 11 and 12, then the held-out line


def run_example(cmd, env=None):
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def c_example_output(stories):
    exe = os.environ.get("QKD_DISTILL_EXAMPLE")
    if not exe:
        pytest.skip("QKD_DISTILL_EXAMPLE (examples/distill.c's binary) not set")
    return run_example([exe, *stories, STEPS])


def printed_losses(text):
    """{step: loss string} of the example's step lines."""
    return {int(m.group(1)): m.group(2)
            for m in re.finditer(r"^step +(\d+)  loss (\S+)", text, re.M)}


def test_python_example_prints_what_the_c_example_prints(stories):
    expected = c_example_output(stories)
    assert len(printed_losses(expected)) == 3 and "held-out" in expected
    env = dict(os.environ, PYTHONPATH=os.path.join(SOURCE, "bindings", "python"))
    script = os.path.join(SOURCE, "examples", "distill.py")
    assert run_example([sys.executable, script, *stories, STEPS], env) == expected


def test_cpp_example_prints_what_the_c_example_prints(stories):
    exe = os.environ.get("QKD_DISTILL_CPP_EXAMPLE")
    if not exe:
        pytest.skip("QKD_DISTILL_CPP_EXAMPLE not set")
    assert run_example([exe, *stories, STEPS]) == c_example_output(stories)


def make_job(ctx, stories, steps):
    model, tok_path, text = stories
    teacher, student = qkd.Model.load(ctx, model), qkd.Model.load(ctx, model)
    student.set_quantizer(qkd.Quantizer(ctx, scheme="asym", bits=4, group_size=32))
    opt = qkd.Optimizer(student, lr=5e-4, schedule="cosine", warmup_steps=steps // 10,
                        total_steps=steps)
    data = qkd.Dataset.from_text(ctx, qkd.Tokenizer.load(ctx, tok_path), text)
    data.set_split(1, 8)
    return teacher, student, qkd.Loss(ctx, "fkl"), opt, data


def test_distill_run_losses_equal_the_c_example(ctx, stories):
    """The library's own loop, driven with a Python callback, gives the C
    example's losses to its printed precision."""
    expected = printed_losses(c_example_output(stories))
    steps = int(STEPS)
    seen = []
    run = qkd.Distill(ctx, *make_job(ctx, stories, steps), batch=8, seq=64,
                      total_steps=steps, on_step=seen.append)
    assert run.run()
    assert [s.step for s in seen] == list(range(1, steps + 1))
    assert run.step == steps
    np.testing.assert_array_equal(run.history, np.array([s.loss for s in seen], np.float32))
    for step, loss in expected.items():
        assert "%.4f" % seen[step - 1].loss == loss


def test_callback_stops_the_run_or_raises_through_it(ctx, stories):
    job = make_job(ctx, stories, 10)
    run = qkd.Distill(ctx, *job, batch=2, seq=16, total_steps=10,
                      on_step=lambda stats: stats.step == 2)
    assert run.run() is False and run.step == 2

    def fail(stats):
        raise RuntimeError("stop at %d" % stats.step)
    run = qkd.Distill(ctx, *job, batch=2, seq=16, total_steps=10, on_step=fail)
    with pytest.raises(RuntimeError, match="stop at 1"):
        run.run()
    assert run.step == 1


def test_one_step_by_hand_matches_numpy(ctx, stories):
    """forward, logits into a preallocated array, cross-entropy checked in
    double precision by numpy, backward, gradients and an update."""
    teacher, student, loss, opt, data = make_job(ctx, stories, 4)
    tokens, targets = data.batch(0, 2, 16)
    student.forward(tokens)
    logits = np.zeros((2, 16, 512), np.float32)
    assert student.logits(out=logits) is logits
    z = logits.astype(np.float64).reshape(-1, 512)
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    ce = -logp[np.arange(32), targets.ravel()].mean()
    student.zero_grad()
    assert student.cross_entropy(targets) == pytest.approx(ce, rel=1e-5)
    student.backward()
    name = "blk.0.attn_q.weight"
    before, grad = student.get(name), student.grad(name)
    assert grad.shape == (64, 64) and np.abs(grad).max() > 0
    info = opt.step()
    assert info.step == 1 and not info.skipped and info.grad_norm > 0
    assert not np.array_equal(student.get(name), before)
    after_one = student.get(name)
    assert opt.step(wait=False) is None
    assert opt.last_step().step == 2
    assert not np.array_equal(student.get(name), after_one)


def test_deferred_loss_and_beta_from_teacher(ctx, stories):
    """compute(wait=False) queues the loss and value() reads what a waiting
    compute returns; beta_from_teacher gives CAKLD with that batch's
    teacher confidence."""
    teacher, student, _, _, data = make_job(ctx, stories, 4)
    tokens, targets = data.batch(0, 2, 16)
    teacher.forward(tokens)
    student.forward(tokens)
    fixed, auto = qkd.Loss(ctx), qkd.Loss(ctx)
    fixed.add("cakld", beta=0.2)
    auto.add("cakld", beta=0.2, beta_from_teacher=1)
    waited = fixed.compute(student, teacher, targets)
    assert fixed.compute(student, teacher, targets, wait=False) is None
    assert fixed.value() == waited
    assert auto.compute(student, teacher, targets, wait=False) is None
    assert auto.value() != pytest.approx(waited, rel=1e-4)
    with pytest.raises(qkd.InvalidArgError):
        qkd.Loss(ctx).add("fkl", beta_from_teacher=1)


def test_logits_by_block_give_the_same_loss(ctx, stories):
    """set_logits_rows: the loss computes the logits a block of rows at a
    time; the value is the one of logits stored whole, and logits() reads
    them all."""
    teacher, student, loss, _, data = make_job(ctx, stories, 4)
    tokens, targets = data.batch(0, 2, 16)
    teacher.forward(tokens)
    student.forward(tokens)
    whole, logits = loss.compute(student, teacher, targets), student.logits()
    for model in (teacher, student):
        model.set_logits_rows(5)
        model.forward(tokens)
    assert loss.compute(student, teacher, targets) == whole
    np.testing.assert_array_equal(student.logits(), logits)
    with pytest.raises(qkd.InvalidArgError):
        student.set_logits_rows(-1)


def test_frozen_teacher_gives_the_same_logits_and_refuses_gradients(ctx, stories):
    trained, frozen = qkd.Model.load(ctx, stories[0]), qkd.Model.load(ctx, stories[0])
    frozen.set_trainable(False)
    tokens = np.arange(2 * 16, dtype=np.int32).reshape(2, 16) % 512
    trained.forward(tokens)
    frozen.forward(tokens)
    np.testing.assert_array_equal(frozen.logits(), trained.logits())
    with pytest.raises(qkd.StateError):
        frozen.cross_entropy(tokens)
    with pytest.raises(qkd.StateError):
        frozen.backward()
    with pytest.raises(qkd.StateError):  # no gradient buffers at all
        frozen.grad(1)
    assert frozen.cross_entropy(tokens, compute_grad=False) == pytest.approx(
        trained.cross_entropy(tokens, compute_grad=False), rel=1e-6)
    frozen.set_matmul_precision("bf16")
    frozen.forward(tokens)
    bf16 = frozen.logits()
    assert not np.array_equal(bf16, trained.logits())
    np.testing.assert_allclose(bf16, trained.logits(), rtol=0.02, atol=0.1)  # bf16: 2^-8
    with pytest.raises(ValueError):
        frozen.set_matmul_precision("fp8")


def test_tensor_set_get_round_trip_without_copies(ctx, stories):
    model = qkd.Model.load(ctx, stories[0])
    w = model.get("blk.1.ffn_down.weight")
    assert w.shape == (64, 172) and w.dtype == np.float32
    model.set(model.tensor_index("blk.1.ffn_down.weight"), w * 2)
    out = np.empty_like(w)
    assert model.get("blk.1.ffn_down.weight", out=out) is out
    np.testing.assert_array_equal(out, w * 2)


def test_quantize_outputs_reconstruct_the_weights(ctx, stories):
    model = qkd.Model.load(ctx, stories[0])
    w = model.get("blk.0.ffn_gate.weight")  # (172, 64)
    q = qkd.Quantizer(ctx, scheme="asym", bits=4, group_size=32)
    wq, codes, scales, zeros = q.quantize(w)
    assert scales.shape == (172 * 2,) and codes.min() >= 0 and codes.max() <= 15
    groups = (codes.reshape(-1, 32) - zeros[:, None]) * scales[:, None]
    np.testing.assert_allclose(groups.reshape(w.shape), wq, rtol=1e-6, atol=1e-7)
    assert np.abs(wq - w).max() <= scales.max() / 2 * 1.001


def test_gguf_export_round_trip(ctx, stories, tmp_path):
    model = qkd.Model.load(ctx, stories[0])
    path = tmp_path / "teacher.gguf"
    model.save_gguf(path, type="f32", embd_type="f32", name="stories260K")
    again = qkd.Model.load(ctx, path)
    assert again.config == model.config
    for i in range(model.n_tensors):
        np.testing.assert_array_equal(again.get(i), model.get(i))


def test_tokenizer_round_trip(ctx, stories):
    tok = qkd.Tokenizer.load(ctx, stories[1])
    ids = tok.encode("Once upon a time, a cat sat.")
    assert ids.dtype == np.int32 and ids[0] == tok.bos and tok.vocab_size == 512
    assert tok.decode(ids) == "Once upon a time, a cat sat."
    assert tok.encode("hi", bos=False, eos=True)[-1] == tok.eos
