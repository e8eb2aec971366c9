# PyTorch's scaled_dot_product_attention forward alone at both models' attention shapes
# (causal, bf16, head size 64, k and v repeated to every head as Hugging Face's Llama passes
# them), the mean of 20 calls after 3 warm-up calls, and the CUDA kernels it ran: the
# competitor's attention beside benchmarks/cuda-kdqat-attn's forward_ms.
import torch, torch.nn.functional as F

for name, B, H in [("smollm135m", 16, 9), ("tinyllama1b", 4, 32)]:
    T, D = 1024, 64
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for _ in range(3):
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(20):
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / 20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.cuda.synchronize()
    kernels = sorted({e.name for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA})
    print('{"shape": "%s", "forward_ms": %.4f, "forward_tflops": %.1f, "kernels": %s}'
          % (name, ms, 2 * B * H * T * T * D / ms / 1e9, kernels))
