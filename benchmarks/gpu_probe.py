"""The probe of ../shared/docs/gpu_plan.md section 7 (issue 37): the GPU measurements that decide each change,
in one process, one JSON. Run by benchmarks/run_gpu.sh after the tests (or alone):

    python benchmarks/gpu_probe.py --out $OUT/gpu_probe.json [--quick]

Parts (each timed with CUDA events after a warm-up, medians of ``--reps``; each part is skipped with its reason
recorded if it fails, so one failure never loses the others):

1. ``host``: one cross-entropy forward + backward at 4096 x 1000 fp32 under torch.profiler, lean path
   (``_cpp_fused_loss``) and the custom-op path: CUDA kernel launches, CPU self time, wall time; eager
   ``F.cross_entropy`` beside them.
2. ``row_kernels``: the CUDA forward and backward kernels alone (``_cpp_row_losses_fwd/bwd``) for ICE and CE,
   bf16 8192 x 131072 and fp32 16384 x 131072, with the bytes each moves and a ``copy_`` of the same logits.
3. ``gemm``: one 8192 x 4096 x 128256 bf16 ``torch.mm``: the TFLOP/s that sets the fused linear loss's floor.
4. ``linear_loss``: the fused linear ICE at 8192 x 128256 x 4096 bf16, forward + backward, for chunks of
   {256, 512, 1024, 2048, automatic} tokens with fp32 accumulation and {256, 512, automatic} in low_memory
   mode: time and max_memory_allocated above the inputs (the returned gradients included; their size is
   recorded).
5. ``inner_step_graph``: the capturable inner step (Adam, 11.2M fp32 parameters: resnet18_width's size) captured
   in a CUDA graph and replayed, against eager calls: bitwise equality and time per step (GB/s, 4R+3W).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback

import torch

import sophon_fast
from sophon_fast import functional as F

IGNORE = -100


def _events_ms(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def part_host(reps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile
    from sophon_fast.functional import _reduce
    from sophon_fast.ops._checks import assert_targets_in_range
    g = torch.Generator("cuda").manual_seed(0)
    z = torch.randn(4096, 1000, generator=g, device="cuda").requires_grad_(True)
    y = torch.randint(0, 1000, (4096,), generator=g, device="cuda")

    def custom_op(zz, yy):
        assert_targets_in_range(yy, 1000, IGNORE, "probe")
        loss, _ = torch.ops.sophon_fast.row_losses(zz, yy, [1.0, 0.0, 0.0, 0.0], 1.0, IGNORE)
        return _reduce(loss, yy, "mean", IGNORE, zz.dtype)

    out = {}
    for name, fn in (("eager_F.cross_entropy", torch.nn.functional.cross_entropy), ("lean", F.cross_entropy),
                     ("custom_op", custom_op)):
        def step():
            with sophon_fast.use_backend(None if name.startswith("eager") else "cuda"):
                return torch.autograd.grad(fn(z, y), z)[0]
        ms = _events_ms(step, reps)
        wall = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            wall.append((time.perf_counter() - t0) * 1e3)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        cpu_self_us = sum(e.self_cpu_time_total for e in prof.events() if e.device_type != torch.autograd.DeviceType.CUDA)
        out[name] = dict(event_ms=round(ms, 4), wall_ms=round(statistics.median(wall), 4), cuda_kernels=len(kernels),
                         cpu_self_us=round(cpu_self_us, 1))
    return out


def part_row_kernels(reps: int, quick: bool) -> dict:
    out = {}
    shapes = [("bf16", 8192, 131072, torch.bfloat16), ("fp32", 16384, 131072, torch.float32)]
    if quick:
        shapes = [("bf16", 1024, 131072, torch.bfloat16), ("fp32", 1024, 131072, torch.float32)]
    for tag, n, c, dtype in shapes:
        g = torch.Generator("cuda").manual_seed(0)
        z = (torch.randn(n, c, generator=g, device="cuda") * 3).to(dtype)
        y = torch.randint(0, c, (n,), generator=g, device="cuda")
        nbytes = z.numel() * z.element_size()
        dst = torch.empty_like(z)
        copy_ms = _events_ms(lambda: dst.copy_(z), reps)
        del dst
        row = dict(shape=f"{n}x{c}", logits_gb=round(nbytes / 1e9, 3), copy_ms=round(copy_ms, 4),
                   copy_gbps=round(2 * nbytes / copy_ms / 1e6, 1))
        for loss, w in (("ice", [0.0, 1.0, 0.0, 0.0]), ("ce", [1.0, 0.0, 0.0, 0.0])):
            fwd = lambda: torch.ops.sophon_fast._cpp_row_losses_fwd(z, y, w, 1.0, IGNORE)  # noqa: E731
            _, stats = fwd()
            gl = torch.full((n,), 1.0 / n, device="cuda")
            bwd = lambda: torch.ops.sophon_fast._cpp_row_losses_bwd(gl, z, y, stats, w, 1.0, IGNORE)  # noqa: E731
            f_ms, b_ms = _events_ms(fwd, reps), _events_ms(bwd, reps)
            row[loss] = dict(fwd_ms=round(f_ms, 4), bwd_ms=round(b_ms, 4), total_ms=round(f_ms + b_ms, 4),
                             fwd_gbps=round(nbytes / f_ms / 1e6, 1), bwd_gbps=round(2 * nbytes / b_ms / 1e6, 1),
                             of_copy_2r1w=round((3 * nbytes / (f_ms + b_ms)) / (2 * nbytes / copy_ms), 3))
        out[tag] = row
        del z, y
        torch.cuda.empty_cache()
    return out


def part_gemm(reps: int, quick: bool) -> dict:
    m, k, n = (8192, 4096, 128256) if not quick else (2048, 4096, 32000)
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    ms = _events_ms(lambda: torch.mm(a, b), reps)
    return dict(shape=f"{m}x{k}x{n}", ms=round(ms, 3), tflops=round(2 * m * k * n / ms / 1e9, 1))


def part_linear_loss(reps: int, quick: bool) -> dict:
    n, v, h = (8192, 128256, 4096) if not quick else (2048, 32000, 1024)
    g = torch.Generator("cuda").manual_seed(0)
    hidden = torch.randn(n, h, generator=g, device="cuda").to(torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g, device="cuda") / h ** 0.5).to(torch.bfloat16).requires_grad_(True)
    y = torch.randint(0, v, (n,), generator=g, device="cuda")
    grads_mb = (hidden.numel() + weight.numel()) * 2 / 2 ** 20
    from sophon_fast.ops.linear_loss import mixed_mm_available
    out = dict(shape=f"{n}x{v}x{h}", returned_grads_mb=round(grads_mb, 1),
               mixed_mm_available=mixed_mm_available("cuda"))
    for t, low in [(t, False) for t in (256, 512, 1024, 2048, None)] + [(t, True) for t in (256, 512, None)]:
        def step():
            loss = F.linear_suppression_loss(hidden, weight, y, loss="ice", chunk_size=t, low_memory=low)
            return torch.autograd.grad(loss, (hidden, weight))
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = _events_ms(step, max(1, reps // 4), warmup=1)
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        key = f"T={t or 'auto'}{' low_memory' if low else ''}"
        out[key] = dict(ms=round(ms, 2), peak_mb=round(peak, 1), extra_beyond_grads_mb=round(peak - grads_mb, 1))
    return out


def _reset(p, m, v, step, p0) -> None:
    p.copy_(p0)
    m.zero_()
    v.zero_()
    step.zero_()


def part_inner_step_graph(reps: int) -> dict:
    numel = 11_200_000
    g = torch.Generator("cuda").manual_seed(0)
    p0 = torch.randn(numel, generator=g, device="cuda")
    grad = torch.randn(numel, generator=g, device="cuda") * 1e-2
    args = (2, 1e-4, 0.9, 0.999, 1e-8, 0.0, False)

    def fresh():
        return p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0), torch.zeros((), dtype=torch.long, device="cuda")

    with sophon_fast.use_backend("cuda"):
        pe, me, ve, se = fresh()
        for _ in range(10):
            torch.ops.sophon_fast.inner_step_capturable_(pe, grad, me, ve, se, *args)
        pg, mg, vg, sg = fresh()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(s):   # warm-up on the side stream, then capture one step (which advances sg once)
            torch.ops.sophon_fast.inner_step_capturable_(pg, grad, mg, vg, sg, *args)
            torch.cuda.synchronize()
            _reset(pg, mg, vg, sg, p0)
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, stream=s):
                torch.ops.sophon_fast.inner_step_capturable_(pg, grad, mg, vg, sg, *args)
        torch.cuda.current_stream().wait_stream(s)
        _reset(pg, mg, vg, sg, p0)
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
        equal = bool(torch.equal(pe, pg) and torch.equal(me, mg) and torch.equal(ve, vg) and torch.equal(se, sg))
        eager_ms = _events_ms(lambda: torch.ops.sophon_fast.inner_step_capturable_(pe, grad, me, ve, se, *args), reps)
        host_ms = _events_ms(lambda: torch.ops.sophon_fast.inner_step_(pe, grad, me, ve, *args[:6], 10, False), reps)
        graph_ms = _events_ms(graph.replay, reps)
    nbytes = 7 * 4 * numel
    return dict(numel=numel, graph_equals_eager=equal, eager_capturable_ms=round(eager_ms, 4),
                eager_host_step_ms=round(host_ms, 4), graph_replay_ms=round(graph_ms, 4),
                graph_gbps=round(nbytes / graph_ms / 1e6, 1), host_step_gbps=round(nbytes / host_ms / 1e6, 1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="smaller shapes (a smoke run)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_probe.py: no CUDA device")
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, backends=sophon_fast.backend_report(False))
    parts = [("host", lambda: part_host(args.reps)), ("row_kernels", lambda: part_row_kernels(args.reps, args.quick)),
             ("gemm", lambda: part_gemm(args.reps, args.quick)),
             ("linear_loss", lambda: part_linear_loss(args.reps, args.quick)),
             ("inner_step_graph", lambda: part_inner_step_graph(args.reps))]
    for name, fn in parts:
        t0 = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as e:  # record and go on: one failing part must not lose the others
            result[name] = dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])
        result[name + "_seconds"] = round(time.perf_counter() - t0, 1)
        torch.cuda.empty_cache()
        with open(args.out, "w") as f:   # after every part: a cut run keeps what finished
            json.dump(result, f, indent=1)
        print(f"[gpu_probe] {name}: {json.dumps(result[name])[:600]}", flush=True)


if __name__ == "__main__":
    main()
