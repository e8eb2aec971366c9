#!/usr/bin/env python3
"""Golden loss and gradients of stories260K on a fixed batch.

An independent PyTorch implementation of the llama2.c LLaMA forward pass
(token embedding, RMSNorm, interleaved RoPE, causal grouped-query attention,
SwiGLU MLP, tied or untied head), computed in float64 on the CPU. It shares no
code with libqkd; tests/test_hf.c compares libqkd's loss and gradients with
the file written here.

Usage:
    torch_golden.py MODEL.bin IDS.txt OUT.bin [REF_LOGITS.bin]

MODEL.bin   llama2.c legacy checkpoint (stories260K.bin)
IDS.txt     whitespace-separated token ids (gen_greedy_n256.input_token_ids.txt)
REF_LOGITS  optional: llama2.c's float32 logits [16][vocab] of positions 0..15
            of IDS; the forward pass is checked against them first.

The batch: B = 2 sequences, T = 32; sequence b takes ids[b*40 : b*40+33],
its inputs are the first 32 of those and its targets the last 32.

Output format (OUT.bin, all numbers little-endian):
    char[8]   magic "QKDGOLD1"
    i32       B, T
    i32       tokens[B*T]      inputs, row-major [B][T]
    i32       targets[B*T]
    f64       loss             mean cross-entropy over the B*T positions
    i32       n_tensors
    then per tensor, in libqkd's tensor order (token_embd; per layer
    attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate,
    ffn_down, ffn_up; output_norm; output only when untied):
        i32   name_len
        char  name[name_len]   GGUF name, e.g. "blk.0.attn_q.weight", no NUL
        i64   n_elements
        f64   l2               L2 norm of the whole gradient
        i32   n_samples        min(n_elements, 256)
        n_samples times:
            i32 index          flat index into the row-major gradient
            f64 value          the gradient there
Linear weights are [out_features][in_features]; attn_q/attn_k rows are in
llama2.c's interleaved RoPE order. The token_embd gradient includes the tied
head's contribution. Sample i is at index (i * 7919) mod n_elements when the
tensor has more than 256 elements (7919 is prime, so the samples are distinct
and spread over rows and columns), else at index i.
"""
import math
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F

MAGIC = b"QKDGOLD1"
MAX_SAMPLES = 256
SAMPLE_STRIDE = 7919
B, T, SEQ_STEP = 2, 32, 40

LAYER_KINDS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
               "ffn_norm", "ffn_gate", "ffn_down", "ffn_up")


def tensor_names(n_layers, tied):
    """GGUF names in libqkd's tensor order."""
    names = ["token_embd.weight"]
    for layer in range(n_layers):
        names += ["blk.%d.%s.weight" % (layer, k) for k in LAYER_KINDS]
    names.append("output_norm.weight")
    if not tied:
        names.append("output.weight")
    return names


def read_llama2c(path):
    """(config dict, {gguf name: float64 tensor}) of a llama2.c checkpoint."""
    with open(path, "rb") as f:
        raw = f.read()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack_from("<7i", raw, 0)
    tied = vocab > 0
    vocab = abs(vocab)
    hd = dim // n_heads
    kv_dim = n_kv * hd
    flat = np.frombuffer(raw, dtype="<f4", offset=28)
    pos = 0

    def take(*shape):
        nonlocal pos
        n = int(np.prod(shape))
        if pos + n > flat.size:
            raise ValueError("%s: truncated" % path)
        a = flat[pos:pos + n].reshape(shape)
        pos += n
        return torch.from_numpy(a.astype(np.float64))

    emb = take(vocab, dim)
    att_norm = take(n_layers, dim)
    wq = take(n_layers, dim, dim)
    wk = take(n_layers, kv_dim, dim)
    wv = take(n_layers, kv_dim, dim)
    wo = take(n_layers, dim, dim)
    ffn_norm = take(n_layers, dim)
    w1 = take(n_layers, hidden, dim)
    w2 = take(n_layers, dim, hidden)
    w3 = take(n_layers, hidden, dim)
    out_norm = take(dim)
    take(seq_len, hd // 2)  # freq_cis_real: unused, RoPE is recomputed
    take(seq_len, hd // 2)  # freq_cis_imag
    out = None if tied else take(vocab, dim)
    if pos != flat.size:
        raise ValueError("%s: %d trailing floats" % (path, flat.size - pos))

    params = {"token_embd.weight": emb}
    per_layer = (att_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3)
    for layer in range(n_layers):
        for kind, t in zip(LAYER_KINDS, per_layer):
            params["blk.%d.%s.weight" % (layer, kind)] = t[layer].clone()
    params["output_norm.weight"] = out_norm
    if out is not None:
        params["output.weight"] = out
    cfg = dict(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads,
               n_kv_heads=n_kv, vocab_size=vocab, rope_theta=10000.0,
               norm_eps=1e-5, tied=tied)
    return cfg, params


def rmsnorm(x, w, eps):
    return x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps) * w


def rope(x, theta):
    """Interleaved RoPE (llama2.c, GGUF): the pair (2j, 2j+1) of each head
    at position p turns by the angle p * theta^(-2j/hd). x: [B, T, H, hd]."""
    _, t, _, hd = x.shape
    j = torch.arange(hd // 2, dtype=torch.float64)
    freq = theta ** (-2.0 * j / hd)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * freq[None, :]
    cos = ang.cos()[None, :, None, :]
    sin = ang.sin()[None, :, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def attention(x, p, prefix, cfg):
    b, t, dim = x.shape
    h, kv = cfg["n_heads"], cfg["n_kv_heads"]
    hd = dim // h
    q = (x @ p[prefix + "attn_q.weight"].T).view(b, t, h, hd)
    k = (x @ p[prefix + "attn_k.weight"].T).view(b, t, kv, hd)
    v = (x @ p[prefix + "attn_v.weight"].T).view(b, t, kv, hd)
    q, k = rope(q, cfg["rope_theta"]), rope(k, cfg["rope_theta"])
    # query head i reads key/value head i // (h / kv), as llama2.c does
    k = k.repeat_interleave(h // kv, dim=2)
    v = v.repeat_interleave(h // kv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    att = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    o = torch.einsum("bhts,bshd->bthd", att, v).reshape(b, t, dim)
    return o @ p[prefix + "attn_output.weight"].T


def forward(p, cfg, tokens):
    """Logits [B, T, vocab] of tokens [B, T] (positions 0..T-1)."""
    eps = cfg["norm_eps"]
    x = p["token_embd.weight"][tokens]
    for layer in range(cfg["n_layers"]):
        pre = "blk.%d." % layer
        x = x + attention(rmsnorm(x, p[pre + "attn_norm.weight"], eps), p, pre, cfg)
        hn = rmsnorm(x, p[pre + "ffn_norm.weight"], eps)
        gate = F.silu(hn @ p[pre + "ffn_gate.weight"].T)
        up = hn @ p[pre + "ffn_up.weight"].T
        x = x + (gate * up) @ p[pre + "ffn_down.weight"].T
    x = rmsnorm(x, p["output_norm.weight"], eps)
    head = p["token_embd.weight"] if cfg["tied"] else p["output.weight"]
    return x @ head.T


def check_reference(p, cfg, ids, ref_path):
    """Compare with llama2.c's logits of positions 0..15 of the same run."""
    ref = np.fromfile(ref_path, dtype="<f4").reshape(-1, cfg["vocab_size"])
    n = ref.shape[0]
    with torch.no_grad():
        logits = forward(p, cfg, torch.tensor([ids[:n]]))[0].numpy()
    err = float(np.abs(logits - ref).max())
    print("llama2.c reference logits [%d][%d]: max abs diff %.3g" % (n, cfg["vocab_size"], err))
    if err > 1e-4:
        raise SystemExit("forward pass disagrees with llama2.c's logits")


def sample_indices(n):
    if n <= MAX_SAMPLES:
        return np.arange(n, dtype=np.int64)
    return (np.arange(MAX_SAMPLES, dtype=np.int64) * SAMPLE_STRIDE) % n


def write_golden(path, tokens, targets, loss, names, grads):
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<2i", B, T))
        f.write(tokens.astype("<i4").tobytes())
        f.write(targets.astype("<i4").tobytes())
        f.write(struct.pack("<d", loss))
        f.write(struct.pack("<i", len(names)))
        for name in names:
            g = grads[name].reshape(-1)
            idx = sample_indices(g.size)
            enc = name.encode()
            f.write(struct.pack("<i", len(enc)) + enc)
            f.write(struct.pack("<qdi", g.size, float(np.linalg.norm(g)), idx.size))
            rec = np.empty(idx.size, dtype=[("i", "<i4"), ("v", "<f8")])
            rec["i"] = idx
            rec["v"] = g[idx]
            f.write(rec.tobytes())


def main(argv):
    if len(argv) not in (4, 5):
        raise SystemExit(__doc__)
    cfg, params = read_llama2c(argv[1])
    with open(argv[2]) as f:
        ids = [int(s) for s in f.read().split()]
    if len(argv) == 5:
        check_reference(params, cfg, ids, argv[4])

    seqs = np.array([ids[b * SEQ_STEP: b * SEQ_STEP + T + 1] for b in range(B)], dtype=np.int64)
    tokens, targets = seqs[:, :T], seqs[:, 1:]
    names = tensor_names(cfg["n_layers"], cfg["tied"])
    for name in names:
        params[name].requires_grad_(True)
    logits = forward(params, cfg, torch.from_numpy(tokens))
    loss = F.cross_entropy(logits.reshape(-1, cfg["vocab_size"]),
                           torch.from_numpy(targets).reshape(-1))
    loss.backward()
    grads = {n: params[n].grad.numpy() for n in names}
    write_golden(argv[3], tokens, targets, loss.item(), names, grads)
    print("loss %.10f, %d tensors, written to %s" % (loss.item(), len(names), argv[3]))


if __name__ == "__main__":
    main(sys.argv)
