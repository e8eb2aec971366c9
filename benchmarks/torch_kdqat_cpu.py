#!/usr/bin/env python3
"""PyTorch on the CPU for one KD-QAT step: the CPU variant of
../shared/bench/torch_kdqat.py, at the shapes bench-train uses, so that
libqkd's step can be measured against it in one command.

Step: a frozen teacher's forward (no grad), the student's forward with every
linear layer of the decoder blocks fake-quantized per group (asymmetric,
STE), CAKLD with the teacher's mean top-1 probability as beta, the
student's backward, an AdamW step and zeroing the gradients. Same math as
the GPU script; differences: the CPU, float32 by default (--dtype bfloat16
for the GPU script's precision), AdamW without `fused` (a CUDA option), and
a group that need not divide the row (the last group is partial, as in
libqkd). Prints one JSON line with tokens/s.

  python3 benchmarks/torch_kdqat_cpu.py --cfg 15M --batch 4 --seq 256 --group 32
"""
import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

CFGS = {
    # the 15M LLaMA shape of llama2.c's tinystories models
    "15M": dict(hidden_size=288, intermediate_size=768, num_hidden_layers=6,
                num_attention_heads=6, num_key_value_heads=6, vocab_size=32000),
    # stories260K
    "stories260K": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=5,
                 num_attention_heads=8, num_key_value_heads=4, vocab_size=512),
}


class FQLinear(nn.Linear):
    bits = 4
    group = 32

    def forward(self, x):
        w = self.weight
        o, i = w.shape
        pad = (-i) % self.group
        g = F.pad(w, (0, pad)).reshape(o, (i + pad) // self.group, self.group)
        if pad:  # the partial last group's padding must not widen its range
            valid = torch.arange(i + pad, device=w.device).reshape(g.shape[1:]) < i
            mx = torch.where(valid, g, -torch.inf).amax(-1, keepdim=True)
            mn = torch.where(valid, g, torch.inf).amin(-1, keepdim=True)
        else:
            mx = g.amax(-1, keepdim=True)
            mn = g.amin(-1, keepdim=True)
        mx = mx.clamp(min=0)
        mn = mn.clamp(max=0)
        qmax = 2 ** self.bits - 1
        s = ((mx - mn) / qmax).clamp(min=1e-5)
        z = (-mn / s).round()
        q = (torch.clamp((g / s).round() + z, 0, qmax) - z) * s
        q = q.reshape(o, i + pad)[:, :i]
        wq = w + (q - w).detach()  # STE
        return F.linear(x, wq, self.bias)


def to_student(m, bits, group):
    FQLinear.bits, FQLinear.group = bits, group
    for layer in m.model.layers:
        for mod in list(layer.modules()):
            for name, ch in list(mod.named_children()):
                if isinstance(ch, nn.Linear):
                    ch.__class__ = FQLinear
    return m


def cakld(s_logits, t_logits):
    t = t_logits.float()
    s = s_logits.float()
    tp = F.softmax(t, -1)
    slp = F.log_softmax(s, -1)
    tlp = F.log_softmax(t, -1)
    beta = tp.max(-1).values.mean()
    fkl = (tp * (tlp - slp)).sum(-1).mean()
    sp = slp.exp()
    rkl = (sp * (slp - tlp)).sum(-1).mean()
    return beta * rkl + (1 - beta) * fkl


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cfg", default="15M", choices=sorted(CFGS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="0: PyTorch's default")
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, a.dtype)
    cfg = LlamaConfig(**CFGS[a.cfg], max_position_embeddings=a.seq, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    teacher = LlamaForCausalLM(cfg).to(dtype).eval().requires_grad_(False)
    student = LlamaForCausalLM(cfg).to(dtype)
    student.load_state_dict(teacher.state_dict())
    student = to_student(student, a.bits, a.group)
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    n_params = sum(p.numel() for p in student.parameters())

    def step(x):
        with torch.no_grad():
            tl = teacher(x).logits
        sl = student(x).logits
        loss = cakld(sl, tl)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if a.compile:
        step = torch.compile(step)
    x = torch.randint(0, cfg.vocab_size, (a.batch, a.seq))
    for _ in range(2):
        step(x)
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        loss = step(x)
        times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]
    print(json.dumps(dict(benchmark="torch_kdqat_cpu", cfg=a.cfg, params=n_params,
                          batch=a.batch, seq=a.seq, bits=a.bits, group=a.group, dtype=a.dtype,
                          compile=a.compile, threads=torch.get_num_threads(),
                          step_s=round(dt, 4), tokens_per_s=round(a.batch * a.seq / dt),
                          loss=loss.item())))


if __name__ == "__main__":
    main()
