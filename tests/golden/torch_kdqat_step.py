#!/usr/bin/env python3
"""Golden KD-QAT step of stories260K: W4 asymmetric g32 student, CAKLD loss.

One step of quantization-aware distillation, computed in float64 on the CPU
with the LLaMA of torch_golden.py (imported, not copied). It shares no code
with libqkd; tests/test_kdqat_golden.c compares libqkd's loss and student
gradients with the file written here.

Usage:
    torch_kdqat_step.py MODEL.bin IDS.txt OUT.bin [REF_LOGITS.bin]

Arguments and the batch (B = 2, T = 32) are those of torch_golden.py.

The step:
  teacher   the float weights of MODEL.bin;
  student   the same weights, with every attn_q, attn_k, attn_v,
            attn_output, ffn_gate, ffn_down and ffn_up weight fake-quantized:
            asymmetric 4-bit, groups of 32 along the input dimension (a
            row whose width 32 does not divide, ffn_down's 172, ends with a
            partial group of 172 mod 32 = 12 values with its own scale);
            per group s = max(max - min, 1e-5) / 15,
            z = clamp(-R(min / s), 0, 15),
            Q(w) = (clamp(R(w / s) + z, 0, 15) - z) * s,
            R rounding half away from zero (BitDistiller's grid);
            straight-through estimator: dL/dw = dL/dQ(w). Embeddings (and
            so the tied head) and norms stay in float;
  beta      the teacher's mean top-1 probability over the B*T positions;
  loss      CAKLD at temperature 1: per position, with p the teacher's
            softmax and q the student's,
            beta * KL(q||p) + (1 - beta) * KL(p||q), averaged over the B*T
            positions; the teacher is a constant.

Output format (OUT.bin, all numbers little-endian), torch_golden.py's with a
new magic and beta:
    char[8]   magic "QKDKDQ01"
    i32       B, T
    i32       tokens[B*T]      inputs, row-major [B][T]
    i32       targets[B*T]     next tokens (not used by CAKLD; kept so the
                               layout matches torch_golden.py's)
    f64       beta             teacher confidence
    f64       loss             CAKLD, mean over the B*T positions
    i32       n_tensors
    then per student tensor, in libqkd's tensor order, the record of
    torch_golden.py (name, n_elements, L2 norm of the gradient, samples of
    the gradient at indices (i * 7919) mod n_elements).

Before writing, the script checks itself: the forward pass against
llama2.c's logits (when REF_LOGITS is given); the quantizer's grid (every
Q(w) / s + z an integer code in 0..15, every weight within s/2 of its level
unless clamped); that an unquantized student gives loss 0 and zero
gradients; and that no w / s (or min / s) comes within 5e-6 of a rounding
tie, which float32 arithmetic could break the other way, moving a weight by
a whole step.
"""
import struct
import sys

import numpy as np
import torch

import torch_golden as tg

MAGIC = b"QKDKDQ01"
BITS, GROUP = 4, 32
QMAX = 2 ** BITS - 1
# float32 arithmetic (libqkd's) moves x = w/s, |x| <= 15, by a few ulps,
# about 4e-6: an x closer than this to a tie could round the other way
TIE_MARGIN = 5e-6
QUANTIZED = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_down", "ffn_up")


def round_half_away(x):
    # torch.round rounds half to even; BitDistiller's grid does not
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def groups_of(w):
    """Split a [rows][cols] weight into its groups: a list of [rows][<=32]
    column slices, the last one partial when 32 does not divide cols."""
    return [w[:, c:c + GROUP] for c in range(0, w.shape[1], GROUP)]


def quantize_group(g):
    """(Q(g), s, z, x = g / s) for one [rows][n] column slice, per row."""
    hi = g.max(dim=1, keepdim=True).values
    lo = g.min(dim=1, keepdim=True).values
    s = (hi - lo).clamp(min=1e-5) / QMAX
    z = (-round_half_away(lo / s)).clamp(0, QMAX)
    x = g / s
    q = ((round_half_away(x) + z).clamp(0, QMAX) - z) * s
    return q, s, z, x


def fake_quantize(w):
    """Q(w) of a float64 weight and the smallest distance of any value it
    rounds (w / s and min / s) to a rounding tie k + 1/2."""
    parts, tie = [], float("inf")
    for g in groups_of(w):
        q, s, z, x = quantize_group(g)
        check_grid(g, q, s, z)
        parts.append(q)
        lo = g.min(dim=1, keepdim=True).values / s
        for v in (x, lo):
            tie = min(tie, float((v - torch.floor(v) - 0.5).abs().min()))
    return torch.cat(parts, dim=1), tie


def check_grid(g, q, s, z):
    """Every group has at most 16 levels (c - z) s, and each value lies
    within s/2 of its level unless it is beyond the representable range
    [-z s, (15 - z) s] and clamped to its end."""
    codes = q / s + z
    if (codes - round_half_away(codes)).abs().max() > 1e-9 or codes.min() < -1e-9 \
            or codes.max() > QMAX + 1e-9:
        raise SystemExit("quantizer: a value off the 4-bit grid")
    tol = s * (0.5 + 1e-9)
    clamped = (g < -z * s - tol) | (g > (QMAX - z) * s + tol)
    near = (q - g).abs() <= tol
    if not bool((near | clamped).all()):
        raise SystemExit("quantizer: a value not rounded to its nearest level")


def is_quantized(name):
    return any(".%s." % kind in name for kind in QUANTIZED)


def student_weights(params, quantize):
    """Student parameters as leaves and the forward weights built on them:
    for a quantized tensor w + (Q(w) - w).detach(), which is Q(w) forward
    and passes dL/dQ straight through to w (STE). Also returns the closest
    rounding tie."""
    leaves = {n: t.clone().requires_grad_(True) for n, t in params.items()}
    used, tie = {}, float("inf")
    for name, w in leaves.items():
        used[name] = w
        if quantize and is_quantized(name):
            q, t = fake_quantize(w.detach())
            tie = min(tie, t)
            used[name] = w + (q - w.detach())
    return leaves, used, tie


def teacher_confidence(log_p):
    return float(log_p.exp().max(dim=-1).values.mean())


def cakld(student_logits, log_p, beta):
    """Mean over positions of beta KL(q||p) + (1 - beta) KL(p||q)."""
    log_q = torch.log_softmax(student_logits, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    rkl = (q * (log_q - log_p)).sum(dim=-1)
    fkl = (p * (log_p - log_q)).sum(dim=-1)
    return (beta * rkl + (1.0 - beta) * fkl).mean()


def kd_step(params, cfg, tokens, log_p, beta, quantize):
    """(loss, {name: gradient}, closest tie) of one CAKLD step."""
    leaves, used, tie = student_weights(params, quantize)
    logits = tg.forward(used, cfg, tokens).reshape(-1, cfg["vocab_size"])
    loss = cakld(logits, log_p, beta)
    loss.backward()
    return loss.item(), {n: t.grad.numpy() for n, t in leaves.items()}, tie


def self_check_float_student(params, cfg, tokens, log_p, beta):
    loss, grads, _ = kd_step(params, cfg, tokens, log_p, beta, quantize=False)
    worst = max(float(np.abs(g).max()) for g in grads.values())
    print("self-check, float student: loss %.3g, max |grad| %.3g" % (loss, worst))
    if abs(loss) > 1e-12 or worst > 1e-12:
        raise SystemExit("a float student should match the teacher exactly")


def main(argv):
    if len(argv) not in (4, 5):
        raise SystemExit(__doc__)
    cfg, params = tg.read_llama2c(argv[1])
    with open(argv[2]) as f:
        ids = [int(s) for s in f.read().split()]
    if len(argv) == 5:
        tg.check_reference(params, cfg, ids, argv[4])

    seqs = np.array([ids[b * tg.SEQ_STEP: b * tg.SEQ_STEP + tg.T + 1] for b in range(tg.B)],
                    dtype=np.int64)
    tokens, targets = seqs[:, :tg.T], seqs[:, 1:]
    tok = torch.from_numpy(tokens)
    with torch.no_grad():
        log_p = torch.log_softmax(tg.forward(params, cfg, tok), dim=-1)
    log_p = log_p.reshape(-1, cfg["vocab_size"])
    beta = teacher_confidence(log_p)
    self_check_float_student(params, cfg, tok, log_p, beta)

    loss, grads, tie = kd_step(params, cfg, tok, log_p, beta, quantize=True)
    print("closest rounding tie: |x - (k + 1/2)| >= %.3g for x = w/s, min/s" % tie)
    if tie < TIE_MARGIN:
        raise SystemExit("a weight is too close to a rounding tie for a float32 comparison")
    names = tg.tensor_names(cfg["n_layers"], cfg["tied"])
    write_golden(argv[3], tokens, targets, beta, loss, names, grads)
    print("beta %.10f, CAKLD loss %.10f, %d tensors, written to %s"
          % (beta, loss, len(names), argv[3]))


def write_golden(path, tokens, targets, beta, loss, names, grads):
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<2i", tg.B, tg.T))
        f.write(tokens.astype("<i4").tobytes())
        f.write(targets.astype("<i4").tobytes())
        f.write(struct.pack("<2d", beta, loss))
        f.write(struct.pack("<i", len(names)))
        for name in names:
            g = grads[name].reshape(-1)
            idx = tg.sample_indices(g.size)
            enc = name.encode()
            f.write(struct.pack("<i", len(enc)) + enc)
            f.write(struct.pack("<qdi", g.size, float(np.linalg.norm(g)), idx.size))
            rec = np.empty(idx.size, dtype=[("i", "<i4"), ("v", "<f8")])
            rec["i"] = idx
            rec["v"] = g[idx]
            f.write(rec.tobytes())


if __name__ == "__main__":
    main(sys.argv)
