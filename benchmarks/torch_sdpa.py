# PyTorch's scaled_dot_product_attention alone at both models' attention shapes (causal, bf16,
# head size 64, k and v repeated to every head as Hugging Face's Llama passes them): the
# competitor's attention beside benchmarks/cuda-kdqat-attn's forward_ms and backward_ms.
# Forward: the mean of 20 calls after 3 warm-up calls. Backward: the mean of 20
# torch.autograd.grad calls on one forward's retained graph, which return the gradients of q, k
# and v without adding them into .grad. Also the CUDA kernels one forward and backward ran.
import torch, torch.nn.functional as F


def mean_ms(fn, n=20):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


for name, B, H in [("smollm135m", 16, 9), ("tinyllama1b", 4, 32)]:
    T, D = 1024, 64
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dout = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fwd = mean_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    bwd = mean_ms(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.autograd.grad(o, (q, k, v), dout)
        torch.cuda.synchronize()
    kernels = sorted({e.name for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA})
    flop = 2 * B * H * T * T * D  # causal: half of the four T x T x D products
    print('{"shape": "%s", "forward_ms": %.4f, "forward_tflops": %.1f, "backward_ms": %.4f, '
          '"backward_tflops": %.1f, "kernels": %s}'
          % (name, fwd, flop / fwd / 1e9, bwd, 2.5 * flop / bwd / 1e9, kernels))
