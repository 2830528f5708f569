#!/usr/bin/env python3
"""Cross-check of `qlab bench --gpu`'s peer: the same GEMMs through PyTorch (cuBLAS/cuBLASLt),
on the same GPU, so the cuBLAS rates our bench opens itself can be compared with what a
PyTorch user gets. FP32 with TF32 off (torch.mm), INT8 with torch._int_mm (s8 x s8 -> s32).
Timing: CUDA events around back-to-back calls, best of three rounds, as our bench does.

Usage: python3 scripts/bench_gpu_torch.py [n ...]   (default 512 1024 2048 4096 8192)
Needs a CUDA build of PyTorch; never run in CI.
"""
import json
import sys

import torch


def ms_per_call(fn):
    fn()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def round_(reps):
        start.record()
        for _ in range(reps):
            fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / reps

    first = round_(1)
    reps = max(1, min(200, int(50 / max(first, 1e-3))))
    return min(round_(reps) for _ in range(3))


def main():
    sizes = [int(a) for a in sys.argv[1:]] or [512, 1024, 2048, 4096, 8192]
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    rows = []
    for n in sizes:
        g = torch.Generator(device=dev).manual_seed(n)
        a = torch.rand(n, n, device=dev, generator=g) - 0.5
        b = torch.rand(n, n, device=dev, generator=g) - 0.5
        fp32 = 2 * n**3 / (ms_per_call(lambda: torch.mm(a, b)) * 1e-3) / 1e12
        a8 = torch.randint(0, 128, (n, n), device=dev, dtype=torch.int8, generator=g)
        b8 = torch.randint(-128, 128, (n, n), device=dev, dtype=torch.int8, generator=g)
        int8 = 2 * n**3 / (ms_per_call(lambda: torch._int_mm(a8, b8)) * 1e-3) / 1e12
        rows.append({"n": n, "torch_fp32_tflops": fp32, "torch_int8_tops": int8})
        print(f"n={n}: torch.mm FP32 {fp32:.1f} TFLOP/s, torch._int_mm INT8 {int8:.1f} TOP/s", flush=True)
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "cuda": torch.version.cuda, "rows": rows}))


if __name__ == "__main__":
    main()
