#!/usr/bin/env python3
"""A tiny random Hugging Face LlamaForCausalLM and its logits, as a fixture
for libqkd's safetensors loader (tests/test_hf.c).

Usage:
    make_hf_fixture.py OUT_DIR

Writes, with transformers' own save_pretrained:
    OUT_DIR/hf_tiny/          config.json, model.safetensors (float32), plus
                              input_ids.txt: 2 lines of 12 token ids, and
                              logits.f32: transformers' logits for them,
                              float32 little-endian [2][12][96]
    OUT_DIR/hf_tiny_sharded/  the same weights saved in several shards
                              (model-0000x-of-0000y.safetensors + index)

The model has grouped-query attention (4 query heads, 2 key/value heads) and
an untied output head; every weight is drawn with a large standard deviation
(0.2) and the norm weights around 1, so that the logits are far from flat and
a wrong tensor mapping or a wrong q/k row order shows.

As a check of the row order that libqkd's loader assumes, the logits are
recomputed by torch_golden.py's independent llama2.c-style forward pass
(interleaved RoPE) after un-permuting q_proj and k_proj: for each head, the
Hugging Face row j (j < hd/2) becomes row 2j and the row j + hd/2 becomes
row 2j+1.
"""
import inspect
import json
import os
import sys

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_golden  # noqa: E402

SEED = 1234
SHAPE = dict(vocab_size=96, hidden_size=32, intermediate_size=56,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, rms_norm_eps=1e-5)
ROPE_THETA = 10000.0
N_SEQ, SEQ_LEN = 2, 12

HF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def make_config():
    kw = dict(SHAPE, tie_word_embeddings=False, hidden_act="silu",
              attention_bias=False, mlp_bias=False)
    # transformers 5 keeps the RoPE base in rope_parameters, 4.x in rope_theta
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": ROPE_THETA}
    else:
        kw["rope_theta"] = ROPE_THETA
    try:
        return LlamaConfig(attn_implementation="eager", **kw)
    except TypeError:
        return LlamaConfig(**kw)


def randomize(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.2 * noise)


def save(model, folder, **kw):
    try:
        model.save_pretrained(folder, safe_serialization=True, **kw)
    except TypeError:  # transformers 5 always writes safetensors
        model.save_pretrained(folder, **kw)


def unpermute(w, n_heads):
    """Hugging Face rotate_half row order -> interleaved pair order."""
    rows, cols = w.shape
    hd = rows // n_heads
    return w.view(n_heads, 2, hd // 2, cols).transpose(1, 2).reshape(rows, cols)


def to_golden_params(model):
    """The model's weights under GGUF names, in float64, q/k un-permuted."""
    cfg = model.config
    params = {}
    for name, t in model.named_parameters():
        t = t.detach().to(torch.float64)
        if name == "model.embed_tokens.weight":
            params["token_embd.weight"] = t
        elif name == "model.norm.weight":
            params["output_norm.weight"] = t
        elif name == "lm_head.weight":
            params["output.weight"] = t
        else:
            _, _, layer, rest = name.split(".", 3)
            kind = HF_LAYER_NAMES[rest.rsplit(".", 1)[0]]
            if kind == "attn_q":
                t = unpermute(t, cfg.num_attention_heads)
            elif kind == "attn_k":
                t = unpermute(t, cfg.num_key_value_heads)
            params["blk.%s.%s.weight" % (layer, kind)] = t
    return params


def main(argv):
    if len(argv) != 2:
        raise SystemExit(__doc__)
    folder = os.path.join(argv[1], "hf_tiny")
    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(make_config()).to(torch.float32).eval()
    randomize(model, gen)

    ids = torch.randint(0, SHAPE["vocab_size"], (N_SEQ, SEQ_LEN), generator=gen)
    ids[0, 0] = 0                          # both ends of the vocabulary
    ids[1, -1] = SHAPE["vocab_size"] - 1
    with torch.no_grad():
        logits = model(input_ids=ids).logits.to(torch.float32)
    assert logits.shape == (N_SEQ, SEQ_LEN, SHAPE["vocab_size"])

    save(model, folder)
    save(model, os.path.join(argv[1], "hf_tiny_sharded"), max_shard_size="40KB")
    with open(os.path.join(folder, "input_ids.txt"), "w") as f:
        for row in ids.tolist():
            f.write(" ".join(str(i) for i in row) + "\n")
    logits.numpy().astype("<f4").tofile(os.path.join(folder, "logits.f32"))

    golden_cfg = dict(dim=SHAPE["hidden_size"], hidden_dim=SHAPE["intermediate_size"],
                      n_layers=SHAPE["num_hidden_layers"],
                      n_heads=SHAPE["num_attention_heads"],
                      n_kv_heads=SHAPE["num_key_value_heads"],
                      vocab_size=SHAPE["vocab_size"], rope_theta=ROPE_THETA,
                      norm_eps=SHAPE["rms_norm_eps"], tied=False)
    with torch.no_grad():
        ours = torch_golden.forward(to_golden_params(model), golden_cfg, ids)
    err = float((ours - logits.to(torch.float64)).abs().max())
    import transformers
    print("transformers %s, torch %s, attention %s" % (
        transformers.__version__, torch.__version__,
        getattr(model.config, "_attn_implementation", "?")))
    print("logits range [%.3f, %.3f], std %.3f" % (
        float(logits.min()), float(logits.max()), float(logits.std())))
    print("independent float64 forward vs transformers: max abs diff %.3g" % err)
    with open(os.path.join(folder, "config.json")) as f:
        print(json.dumps(json.load(f), sort_keys=True))
    for sub in ("hf_tiny", "hf_tiny_sharded"):
        for name in sorted(os.listdir(os.path.join(argv[1], sub))):
            print("%s/%s %d" % (sub, name, os.path.getsize(os.path.join(argv[1], sub, name))))
    if err > 1e-4:
        raise SystemExit("MISMATCH: the q/k row order assumption does not hold")


if __name__ == "__main__":
    main(sys.argv)
