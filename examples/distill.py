#!/usr/bin/env python3
"""Distill a float teacher into a 4-bit student with forward KL: the loop of
examples/distill.c written with the Python binding (bindings/python). It
prints the same lines, to the same digits, as the C example.

Run (with bindings/python on PYTHONPATH, and libqkd installed or named by
QKD_LIB_PATH):
    python3 distill.py stories260K.bin tok512.bin tinystories.txt [STEPS]
"""
import sys
from types import SimpleNamespace

import qkd

B, T, HELD_OUT = 8, 64, 8


def step(j, s, steps, tokens, targets):
    """One step: B windows of T + 1 tokens, both forwards, loss, backward and
    the optimizer's update."""
    j.data.batch(s, B, T, out=(tokens, targets))
    j.teacher.forward(tokens)
    j.student.forward(tokens)
    value = j.loss.compute(j.student, j.teacher, targets)
    j.student.zero_grad()
    j.student.backward()
    info = j.opt.step()  # a skipped step (non-finite) is not fatal
    if s % 10 == 0 or s == steps - 1:
        print("step %4d  loss %.4f  lr %.2e  grad norm %.3f"
              % (s + 1, value, info.lr, info.grad_norm))


def setup(ctx, argv, steps):
    """Teacher, student (a second copy of the teacher with 4-bit weights),
    loss, optimizer and data."""
    j = SimpleNamespace(teacher=qkd.Model.load(ctx, argv[1]), student=qkd.Model.load(ctx, argv[1]))
    tok = qkd.Tokenizer.load(ctx, argv[2])
    j.student.set_quantizer(qkd.Quantizer(ctx, scheme="asym", bits=4, group_size=32))
    j.loss = qkd.Loss(ctx, "fkl")
    j.opt = qkd.Optimizer(j.student, lr=5e-4, schedule="cosine", warmup_steps=steps // 10,
                          total_steps=steps)
    j.data = qkd.Dataset.from_text(ctx, tok, argv[3])
    j.data.set_split(1, HELD_OUT)
    return j


def main(argv):
    if len(argv) < 4:
        print("usage: %s TEACHER TOKENIZER TEXT [STEPS]" % argv[0], file=sys.stderr)
        return 2
    steps = int(argv[4]) if len(argv) > 4 else 100
    if steps < 1:
        return 1
    # Closing the context frees every handle made from it.
    with qkd.Context() as ctx:
        j = setup(ctx, argv, steps)
        ce_teacher, _ = qkd.eval_ce(j.teacher, j.data, B, T)
        ce_rtn, _ = qkd.eval_ce(j.student, j.data, B, T)
        tokens, targets = j.data.batch(0, B, T)  # reused by every step
        for s in range(steps):
            step(j, s, steps, tokens, targets)
        ce_student, _ = qkd.eval_ce(j.student, j.data, B, T)
        print("held-out cross-entropy: teacher %.4f, 4-bit round-to-nearest %.4f, "
              "distilled %.4f" % (ce_teacher, ce_rtn, ce_student))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except qkd.QkdError as e:
        print(e, file=sys.stderr)
        sys.exit(1)
