"""Render benchmarks/RESULTS.md from pytest-benchmark JSON (never typed by hand).

    .venv/bin/python benchmarks/render_results.py                      # results/latest.json (+ results/gpu_*.json)
    .venv/bin/python benchmarks/render_results.py A.json B.json --out RESULTS.md

Every table is headed by the machine that produced it (CPU model, cores, torch threads, torch
version, git sha, date). CPU runs come first; a GPU section appears when a JSON comes from a CUDA
machine (benchmarks/run_gpu.sh writes results/gpu_*.json). All numbers are medians of one run,
compared only within that run.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
FAST_BACKENDS = ("cuda", "triton", "cpp")
ENGINE_TARGETS = {"cnn": 2.0, "cnn_bn": 1.5}   # fast speed-up over reference at K = 50
TARGET_K, RATIO_TARGET, MEMORY_GROWTH = 50, 1.10, 0.10


def _load(path):
    with open(path) as f:
        run = json.load(f)
    rel = os.path.relpath(os.path.abspath(path), os.path.dirname(HERE))
    run["path"] = os.path.basename(path) if rel.startswith("..") else rel
    return run


def caption(run) -> str:
    m = run["machine_info"]
    cpu = m.get("cpu", {})
    gpu = f", GPU {m['cuda_device']}" if m.get("cuda_device") else ""
    sha = m.get("git_sha") or run.get("commit_info", {}).get("id", "?")[:7]
    dirty = "+dirty" if run.get("commit_info", {}).get("dirty") else ""
    timer = (run["benchmarks"][0]["options"].get("timer", "?") if run["benchmarks"] else "?").replace("time.", "")
    clock = {"process_time": "CPU time (process_time)", "perf_counter": "wall clock (perf_counter)"}.get(timer, timer)
    return (f"_{cpu.get('brand_raw', m.get('processor') or '?')}, {cpu.get('count', '?')} cores, "
            f"torch threads {m.get('threads', '?')}{gpu}; torch {m.get('torch', '?')}, triton {m.get('triton')}; "
            f"git {sha}{dirty}; {run.get('datetime', '?')[:16].replace('T', ' ')} UTC; timer: {clock}; {run['path']}_")


def table(head, rows) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def ms(s):
    return "—" if s is None else f"{1e3 * s:.3f}" if s < 0.01 else f"{1e3 * s:.2f}" if s < 1 else f"{1e3 * s:.0f}"


def sec(s):
    return "—" if s is None else f"{s:.3f}"


def ratio(a, b, fmt="{:.2f}x"):
    return "—" if a is None or b is None or b == 0 else fmt.format(a / b)


def groups(run, layer=None, test=None):
    """group -> provider -> benchmark dict, for one layer (extra_info['layer']) or test-name prefix."""
    out = defaultdict(dict)
    for b in run["benchmarks"]:
        info = b.get("extra_info", {})
        if layer is not None and info.get("layer") != layer:
            continue
        if test is not None and not b["name"].startswith(test):
            continue
        out[b["group"]][info.get("provider", b["name"])] = b
    return out


def med(b):
    return None if b is None else b["stats"]["median"]


def best_fast(provs):
    names = [p for p in FAST_BACKENDS if p in provs]
    return min(names, key=lambda p: med(provs[p])) if names else None


def _is_gpu(run) -> bool:
    return bool(run["machine_info"].get("cuda_device"))


def peak_text(run) -> str:
    """How the run's peak memory was measured, in words."""
    return ("the GPU's max_memory_allocated above the allocation at the start" if _is_gpu(run)
            else "RSS high-water above the baseline")


def losses_section(run) -> str:
    gs = groups(run, test="bench_row_loss")
    if not gs:
        return ""
    liger = any("liger" in p for p in gs.values())
    rows = []
    for g, p in gs.items():
        f = best_fast(p)
        gbs, floor = (p[f]["extra_info"].get("GB/s") if f else None), p.get("copy", {}).get("extra_info", {}).get("GB/s")
        rows.append([g, *(ms(med(p.get(n))) for n in ("copy", "eager", "compile")),
                     f"{f} {ms(med(p[f]))}" if f else "—", gbs or "—",
                     f"{100 * gbs / floor:.0f}%" if gbs and floor else "—",
                     ratio(med(p.get("compile")), med(p.get(f)))]
                    + ([ms(med(p.get("liger"))), ratio(med(p.get("liger")), med(p.get(f)))] if liger else [])
                    + [ratio(med(p.get(f)), med(p.get("copy")))])
    head = (["op, dtype, N x C", "copy_ ms", "eager ms", "torch.compile ms", "fast ms", "fast GB/s (2R+1W)",
             "of copy_ GB/s", "fast vs compile"] + (["Liger CE ms", "fast vs Liger"] if liger else [])
            + ["fast / copy_"])
    target = ("Targets (docs/performance.md), GPU: >= 80% of the measured copy bandwidth for 2R+1W (the `of copy_ "
              "GB/s` column: fast GB/s over copy_'s GB/s of the same logits) and faster than Liger's CE on the same "
              "shape. Liger's cross-entropy writes the gradient into its input during the forward (1R+1W in all); "
              "sophon_fast's ops keep the logits and read them again in the backward (2R+1W). torch.compile: one "
              "static compile per shape." if _is_gpu(run) else
              "Targets (docs/performance.md): fast >= 2x faster than torch.compile and <= 3x the copy_ time.")
    return "## 1. Loss ops: forward + backward\n\n" + caption(run) + "\n\n" + table(head, rows) + f"\n\n{target}\n"


def inner_step_section(run) -> str:
    gs = groups(run, layer="inner_step")
    if not gs:
        return ""
    rows = []
    for g, p in gs.items():
        f = best_fast(p)
        info = next(iter(p.values()))["extra_info"]
        rows.append([info["kind"], f"{info['model']} ({info['numel'] / 1e6:.2f}M, {info['tensors']} tensors)",
                     info.get("device_type", "cpu"),
                     *(ms(med(p.get(n))) for n in ("copy", "reference", "torch_foreach")),
                     f"{f} {ms(med(p[f]))}" if f else "—", p[f]["extra_info"].get("GB/s", "—") if f else "—",
                     ratio(med(p.get("torch_foreach")), med(p.get(f))), ratio(med(p.get("reference")), med(p.get(f))),
                     ratio(med(p.get(f)), med(p.get("copy")))])
    floors = groups(run, layer="copy_floor")
    floor = "; ".join(f"{g}: {p['copy']['extra_info'].get('GB/s')} GB/s" for g, p in floors.items())
    return ("## 2. Fused inner step on flat buffers\n\n" + caption(run) + "\n\n" + table(
        ["kind", "params", "device", "copy_ ms", "reference ms", "torch.optim foreach ms", "fused ms", "fused GB/s",
         "fused vs foreach", "fused vs reference", "fused / copy_"], rows) +
        (f"\n\nMeasured copy floor: {floor} (1R+1W).\n" if floor else "\n"))


def engine_rows(run):
    """(arch, K) -> {impl: benchmark}, from every engine group (layers 3 and 5)."""
    out = {}
    for g, p in groups(run, layer="engine").items():
        info = next(iter(p.values()))["extra_info"]
        out[(info["arch"], info["K"])] = p
    return out


def t_mode(p, mode):
    """One outer iteration of ``mode``: its 1-iteration protect() minus the 0-iteration call (setup)."""
    t, setup = med(p.get(mode)), med(p.get(f"{mode}-setup"))
    return None if t is None else t - (setup or 0.0)


def _peak(p, impl):
    b = p.get(impl)
    return None if b is None else b["extra_info"].get("peak_mb")


def _engine_row(arch, K, p):
    tp, tr, tf = med(p.get("passes")), t_mode(p, "reference"), t_mode(p, "fast")
    info = next(iter(p.values()))["extra_info"]
    mr, mf = _peak(p, "reference"), _peak(p, "fast")
    setup = "/".join(ms(med(p.get(f"{m}-setup"))) for m in ("reference", "fast"))
    return [arch, f"{info['params'] / 1e6:.2f}M", K, sec(tp), sec(tr), sec(tf), ratio(tr, tf), ratio(tr, tp),
            ratio(tf, tp), "—" if mr is None else f"{mr:.0f}", "—" if mf is None else f"{mf:.0f}", setup]


ENGINE_HEAD = ["model", "params", "K", "t_model_passes s", "reference s", "fast s", "fast speed-up",
               "reference t_outer/t_passes", "fast t_outer/t_passes", "reference peak MB", "fast peak MB",
               "protect() setup ms (ref/fast, subtracted)"]


def engine_section(run) -> str:
    rows = engine_rows(run)
    sweep = {a for a, K in rows if K != 10} | {a for a, K in rows if a == "resnet18_width"}
    body = [_engine_row(a, K, p) for (a, K), p in sorted(rows.items(), key=lambda kv: (kv[0][0] != "cnn", kv[0]))
            if a in sweep]
    if not body:
        return ""
    growth = []
    for arch in sorted(sweep):
        ks = sorted(K for a, K in rows if a == arch)
        if len(ks) < 2:
            continue
        lo, hi = rows[(arch, ks[0])], rows[(arch, ks[-1])]
        for impl in ("reference", "fast"):
            a, b = _peak(lo, impl), _peak(hi, impl)
            if a is not None and b is not None:
                growth.append([arch, impl, f"K={ks[0]}: {a:.0f}", f"K={ks[-1]}: {b:.0f}", f"{100 * (b / a - 1):+.0f}%"])
    text = ("## 3. Engine: one outer iteration, reference vs fast\n\n" + caption(run) + "\n\n" +
            table(ENGINE_HEAD, body) +
            "\n\nt_model_passes: the same forward+backward passes (K x (support 130 + query 20) + one NTR 150) "
            "run bare in the same process; a mode's time is one protect() call of one outer iteration minus a "
            f"protect() call of zero iterations (its setup, last column). Peak MB: {peak_text(run)}, "
            "each case in its own child process after a warm-up (benchmarks/engine_case.py). On a shared "
            "machine, compare ratios across runs only beyond a few percent (rounds are in the JSON).\n")
    if growth:
        text += "\nPeak memory growth with K:\n\n" + caption(run) + "\n\n" + table(
            ["model", "mode", "peak MB", "peak MB", "growth"], growth) + "\n"
    return text


def shared_forward_section(run) -> str:
    rows, text = engine_rows(run), ""
    sf = groups(run, layer="shared_forward")
    for g, p in sf.items():
        one, two = med(p.get("fwd150")), med(p.get("fwd130+fwd20"))
        if one is None or two is None:
            continue
        fast50 = t_mode(rows.get(("cnn", TARGET_K), {}), "fast")
        share = "" if fast50 is None else (f"; x K = {TARGET_K}: {1e3 * TARGET_K * (two - one):.0f} ms = "
                                           f"{100 * TARGET_K * (two - one) / fast50:.1f}% of fast mode's cnn "
                                           f"K = {TARGET_K} outer iteration")
        text += ("### Shared-forward bound: " + g + "\n\n" + caption(run) + "\n\n" + table(
            ["one forward over 150 rows ms", "forward(130) + forward(20) ms", "max saving per inner step"],
            [[ms(one), ms(two), f"{1e3 * (two - one):.2f} ms ({100 * (two - one) / two:.1f}% of the two forwards)"
              + share]]) + "\n")
    return text


def targets_section(run) -> str:
    rows = engine_rows(run)
    out = []
    for arch, want in ENGINE_TARGETS.items():
        p = rows.get((arch, TARGET_K))
        if p is None:
            continue
        tr, tf, tp = t_mode(p, "reference"), t_mode(p, "fast"), med(p.get("passes"))
        if tr and tf:
            out.append([f"fast >= {want}x faster than reference, {arch}, K = {TARGET_K}", f"{tr / tf:.2f}x",
                        "met" if tr / tf >= want else "missed"])
        if tf and tp:
            out.append([f"fast t_outer / t_model_passes <= {RATIO_TARGET}, {arch}, K = {TARGET_K}",
                        f"{tf / tp:.2f}", "met" if tf / tp <= RATIO_TARGET else "missed"])
            if tr:
                out.append([f"(bound) reference t_outer / t_model_passes, {arch}, K = {TARGET_K}", f"{tr / tp:.2f}",
                            f"fast can be at most {tr / tp:.2f}x faster here"])
    for arch in ENGINE_TARGETS:
        ks = sorted(K for a, K in rows if a == arch)
        if len(ks) < 2:
            continue
        lo, hi = rows[(arch, ks[0])], rows[(arch, ks[-1])]
        a, b = _peak(lo, "fast"), _peak(hi, "fast")
        if a is not None and b is not None:
            out.append([f"fast peak memory K = {ks[0]} -> {ks[-1]} grows <= {100 * MEMORY_GROWTH:.0f}%, {arch}",
                        f"{a:.0f} -> {b:.0f} MB ({100 * (b / a - 1):+.0f}%)",
                        "met" if b / a - 1 <= MEMORY_GROWTH else "missed"])
        a, b = _peak(lo, "reference"), _peak(hi, "reference")
        if a is not None and b is not None:
            out.append([f"reference peak memory grows with K, {arch}", f"{a:.0f} -> {b:.0f} MB ({b / a:.1f}x)",
                        "yes" if b > a * (1 + MEMORY_GROWTH) else "no"])
    e2e = groups(run, layer="e2e")
    for g, p in e2e.items():
        tr, tf = med(p.get("reference")), med(p.get("fast"))
        if tr and tf:
            out.append(["end-to-end demo, same iterations (quality not compared here): fast >= 2x sooner",
                        f"{tr / tf:.2f}x",
                        "met" if tr / tf >= 2 else "missed"])
    if not out:
        return ""
    return "## Targets\n\n" + caption(run) + "\n\n" + table(["target", "measured", "status"], out) + "\n"


def e2e_section(run) -> str:
    gs = groups(run, layer="e2e")
    if not gs:
        return ""
    rows = []
    for g, p in gs.items():
        tr = med(p.get("reference"))
        for impl in ("reference", "fast"):
            b = p.get(impl)
            if b is None:
                continue
            info = b["extra_info"]
            rows.append([impl, info["iterations"], info["K"], sec(med(b)), sec(med(b) / info["iterations"]),
                         ratio(tr, med(b)), "—" if info.get("peak_mb") is None else f"{info['peak_mb']:.0f}"])
    return ("## 4. End-to-end: protect() on the demo task\n\n" + caption(run) + "\n\n" +
            "fashion_mnist -> mnist, cnn_small, the demo's ProtectConfig (3 strategies taking turns, an original-test "
            "evaluation every 10 iterations), no accuracy floor, no checkpoints.\n\n" + table(
                ["mode", "iterations", "K", "protect() s (timer in caption)", "s / iteration", "speed-up vs reference",
                 "peak MB (same run, child process)"], rows) +
            "\n\nThe demo's peak memory is set by its original-test evaluation (batches of 1000 images), not by "
            "the K = 20 trajectories, so both modes peak alike here.\n")


def scaling_section(run) -> str:
    rows = engine_rows(run)
    body = [_engine_row(a, K, p) for (a, K), p in sorted(rows.items(), key=lambda kv: next(
        iter(kv[1].values()))["extra_info"]["params"]) if K == 10 and a != "cnn_bn"]
    if not body:
        return ""
    return ("## 5. Scaling with model size (K = 10)\n\n" + caption(run) + "\n\n" + table(ENGINE_HEAD, body) +
            "\n\ncnn and resnet18_width rows are the K = 10 cases of section 3 (one measurement each).\n")


def linear_loss_section(run) -> str:
    """Fused linear + loss: time and peak memory of eager / compiled materialised losses and the fused op
    (and Liger-Kernel's fused linear cross-entropy where the run has it)."""
    gs = groups(run, layer="linear_loss")
    if not gs:
        return ""
    impls = ("eager", "compile", "fused") + tuple(n for n in ("fused_low_memory", "liger")
                                                  if any(n in p for p in gs.values()))
    rows = []
    for g, p in gs.items():
        peak = {n: p[n]["extra_info"].get("peak_mb") if n in p else None for n in impls}
        f = p.get("fused", {}).get("extra_info", {})
        mb = [("—" if peak[n] is None else f"{peak[n]:.0f}") for n in impls]
        rows.append([g.replace(" fwd+bwd fp32", ""), f.get("logits_mb", "—"), *(ms(med(p.get(n))) for n in impls),
                     ratio(med(p.get("compile")), med(p.get("fused"))), *mb,
                     ratio(peak["eager"], peak["fused"], "{:.1f}x") if peak["fused"] else "—",
                     f"{f.get('backend', '—')}, {f.get('chunk_size', '—')}"])
    names = {"eager": "eager", "compile": "compile", "fused": "fused", "fused_low_memory": "fused low-memory",
             "liger": "Liger FLCE"}
    return ("## Fused linear + loss: forward + backward\n\n" + caption(run) + "\n\n" + table(
        ["case", "logits MB", *(f"{names[n]} ms" for n in impls), "fused speed-up vs compile",
         *(f"{names[n]} peak MB" for n in impls), "eager / fused memory", "fused backend, chunk"], rows) +
        f"\n\nPeak MB: {peak_text(run)}, each case in its own process (warm-up excluded). "
        "Target (docs/performance.md): at vocabulary 128k the fused op needs <= 1/10 of the materialised "
        "path's extra memory and is no slower than torch.compile of it. The `ce` rows are a Liger-style fused "
        "linear cross-entropy (the same op with loss=\"ce\"); `Liger FLCE` is Liger-Kernel's own (CE only).\n")


def render_section(title: str, rs) -> str:
    parts = [f"# {title}\n"]
    for r in rs:
        for section in (targets_section, losses_section, inner_step_section, engine_section,
                        shared_forward_section, e2e_section, scaling_section, linear_loss_section,
                        lm_memory_section, distributed_section, sharded_section, unrolled_section):
            text = section(r)
            if text:
                parts.append(text)
    return "\n".join(parts)


HEADER = ("# Benchmark results\n\n"
          "Generated by `benchmarks/render_results.py` from pytest-benchmark JSON; do not edit by hand. "
          "Medians of one run; every ratio compares numbers of the same run on the same machine.\n\n"
          "Reproduce (CPU): `SOPHON_BENCH_THREADS=1 .venv/bin/python -m pytest benchmarks -q "
          "--benchmark-timer=time.process_time --benchmark-json=benchmarks/results/latest.json && "
          ".venv/bin/python benchmarks/render_results.py`; GPU: `bash benchmarks/run_gpu.sh`. On a shared CPU the "
          "CPU-time timer (process_time, one torch thread) leaves out the time spent waiting for a core (cache and "
          "memory-bandwidth contention remain); each benchmark's 1-minute load average is in its JSON extra_info.\n")
LINEAR, LM, SCALE, SHARDED, UNROLLED = ("Fused linear + loss", "Language-model protection memory", "Scale-out",
                                       "Sharded memory (FSDP2)", "Unrolled meta-gradient")
# Runs of one benchmark file alone get a block of their own (they never replace the whole suite's tables).
STANDALONE = {"linear_loss": LINEAR, "lm_memory": LM, "distributed": SCALE, "sharded_memory": SHARDED,
              "unrolled": UNROLLED}
EMPTY = {"CPU": "# CPU\n\nNo CPU run rendered yet.\n",
         LINEAR: f"# {LINEAR}\n\nNo run of benchmarks/bench_linear_loss.py rendered yet.\n",
         LM: f"# {LM}\n\nNo run of benchmarks/bench_lm_engine.py rendered yet.\n",
         SCALE: f"# {SCALE}\n\nNo run of benchmarks/bench_distributed.py rendered yet.\n",
         SHARDED: f"# {SHARDED}\n\nNo run of benchmarks/bench_sharded.py rendered yet.\n",
         UNROLLED: f"# {UNROLLED}\n\nNo run of benchmarks/bench_unrolled.py rendered yet.\n",
         "GPU": "# GPU\n\nNo GPU run has been made: `bash benchmarks/run_gpu.sh` on a CUDA machine writes "
                "benchmarks/results/gpu_*.json and renders its tables here.\n"}


def _standalone(run):
    """The block title of a run of one standalone benchmark file (every benchmark of one STANDALONE layer;
    a GPU run's block is its own: ``TITLE (GPU)``), else None."""
    layers = {b.get("extra_info", {}).get("layer") for b in run["benchmarks"]}
    title = STANDALONE.get(layers.pop()) if len(layers) == 1 else None
    return f"{title} (GPU)" if title and _is_gpu(run) else title


def lm_memory_section(run) -> str:
    gs = groups(run, layer="lm_memory")
    if not gs:
        return ""
    rows = []
    for g, p in sorted(gs.items(), key=lambda kv: kv[1][next(iter(kv[1]))]["extra_info"]["K"]):
        peak = {m: p[m]["extra_info"].get("peak_mb") if m in p else None for m in ("reference", "fast")}
        rows.append([p[next(iter(p))]["extra_info"]["K"], *(f"{peak[m]:.0f}" if peak[m] else "—" for m in peak),
                     ratio(peak["reference"], peak["fast"], "{:.2f}x") if peak["fast"] else "—"])
    return (f"## {LM}: one iteration, reference vs fast\n\n" + caption(run) + "\n\n" +
            table(["K", "reference peak MB", "fast peak MB", "reference / fast"], rows) +
            "\n\nGPT-2, 2 layers, width 128, vocabulary 32,768 (tied head), blocks of 128 tokens, an Adam attacker on "
            "6 support + 2 query blocks, ICE over the vocabulary through the fused linear op. Peak: "
            f"{peak_text(run)}, each case in its own process after a warm-up.\n")


def unrolled_section(run) -> str:
    """benchmarks/bench_unrolled.py: the adaptive recipe unrolled, fast vs reference, time and memory per K."""
    gs = groups(run, layer="unrolled")
    if not gs:
        return ""
    time_rows, mem = [], {}
    for g, p in sorted(gs.items()):
        e = next(iter(p.values()))["extra_info"]
        if e.get("what") == "time":
            t = {m: med(p.get(m)) for m in ("reference", "fast")}
            ok = t["fast"] and t["reference"] and t["fast"] / t["reference"] <= 1.3
            time_rows.append([e["arch"], e["K"], *(f"{t[m] / e['iterations']:.2f}" if t[m] else "—" for m in t),
                              f"{t['fast'] / t['reference']:.2f}" if t["fast"] and t["reference"] else "—",
                              "met" if ok else "missed"])
        else:
            mem[e["K"]] = {m: p[m]["extra_info"] for m in p}
    parts = [f"## {UNROLLED}: the adaptive recipe, fast vs reference\n\n" + caption(run)]
    if time_rows:
        parts.append(table(["model", "K", "reference s / iteration", "fast s / iteration", "fast / reference",
                            "target <= 1.3"], time_rows) +
                     "\n\nFive iterations per round (one per attacker of the recipe), medians of 3 rounds.")
    ks = sorted(mem)
    if ks:
        rows = []
        for k in ks:
            rows.append([k, *(f"{mem[k][m].get('peak_mb', float('nan')):.1f}" if m in mem[k] else "—"
                              for m in ("reference", "fast")), f"{mem[k].get('fast', {}).get('kept_mb', float('nan')):.1f}"])
        text = table(["K", "reference peak MB", "fast peak MB", "fast keeps (snapshots + batches) MB"], rows)
        lo, hi = ks[0], ks[-1]
        try:
            grow = {m: mem[hi][m]["peak_mb"] - mem[lo][m]["peak_mb"] for m in ("reference", "fast")}
            kept = mem[hi]["fast"]["kept_mb"] - mem[lo]["fast"]["kept_mb"]
            text += (f"\n\nK = {lo} -> {hi}: the fast mode grows by {grow['fast']:.1f} MB against {kept:.1f} MB kept "
                     f"({'met' if grow['fast'] <= kept * 1.02 + 5 else 'missed'}: at most what it keeps, 2% + 5 MB "
                     f"allowed for the random-number states and the allocator), the reference by {grow['reference']:.1f} MB.")
        except (KeyError, TypeError):
            pass
        parts.append(text + f"\n\ncnn_bn ({next(iter(mem[lo].values()))['params']:,} parameters), one iteration of "
                     f"the first attacker (fresh block, Adam). Peak: {peak_text(run)}, each case in its own process.")
    return "\n\n".join(parts) + "\n"


def distributed_section(run) -> str:
    gs = groups(run, layer="distributed")
    rows = []
    for g, p in gs.items():
        one = p.get("1 rank(s)", {}).get("extra_info", {}).get("trajectories_per_second")
        for name, b in sorted(p.items()):
            e = b["extra_info"]
            rows.append([e["world"], e["K"], f"{e.get('trajectories_per_second', float('nan')):.2f}",
                         ratio(e.get("trajectories_per_second"), one) if one else "—"])
    if not rows:
        return ""
    return (f"## {SCALE}: simulated trajectories per second\n\n" + caption(run) + "\n\n" +
            table(["ranks", "K", "trajectories/s", "vs 1 rank"], rows) +
            "\n\ncnn_small, 2 trajectories per iteration, gloo, one torch thread per rank; throughput from rank 0's "
            "per-iteration times (warm-up iteration excluded). Target: N ranks >= 0.8 N.\n")


def sharded_section(run) -> str:
    rows = []
    for g, p in groups(run, layer="sharded_memory").items():
        base = next((b["extra_info"]["peak_mb"] for b in p.values() if b["extra_info"]["world"] == 1), None)
        for name, b in sorted(p.items()):
            e = b["extra_info"]
            rows.append([e["provider"], e["K"], f"{e['peak_mb']:.0f}",
                         " / ".join(f"{x:.0f}" for x in e.get("peak_mb_per_rank", [])), ratio(e["peak_mb"], base)])
    if not rows:
        return ""
    return (f"## {SHARDED}: peak memory per rank\n\n" + caption(run) + "\n\n" +
            table(["run", "K", "peak MB (largest rank)", "per rank", "vs 1 process"], rows) +
            "\n\nGPT-2 (vocabulary 32,768, width 128, 2 layers, head untied: 8.8M parameters), ICE, an Adam attacker, "
            "2 iterations; RSS high-water above each rank's baseline taken just before protect(), one torch thread per "
            "rank, gloo. FSDP2 shards each block, the decoder and the root; each rank keeps its shards of the weights, "
            "backups, meta-gradient and optimiser states (ShardedMode). Prediction before the first run: 0.55x.\n")


def _markers(title):
    return f"<!-- BEGIN {title} (render_results.py) -->", f"<!-- END {title} (render_results.py) -->"


PROBE_TITLE = "GPU probe (issue 37)"


def is_probe(run) -> bool:
    """benchmarks/gpu_probe.py's JSON (not pytest-benchmark's)."""
    return "machine_info" not in run and "row_kernels" in run


def _cells(d: dict, keys) -> list:
    return [d.get(k, "—") for k in keys]


def render_probe(probes) -> str:
    """Tables of benchmarks/gpu_probe.py's parts (one probe JSON each), the card named."""
    out = [f"# {PROBE_TITLE}", ""]
    for pr in probes:
        out.append(f"_{pr.get('device', '?')}; torch {pr.get('torch', '?')}; {pr['path']}_")
        host = pr.get("host", {})
        if "error" not in host:
            out += ["", "## Host overhead: CE fwd+bwd 4096 x 1000 fp32", "",
                    table(["path", "CUDA events ms", "wall ms", "CUDA kernels", "CPU self us"],
                          [[k] + _cells(v, ("event_ms", "wall_ms", "cuda_kernels", "cpu_self_us"))
                           for k, v in host.items()])]
        rk = pr.get("row_kernels", {})
        if "error" not in rk:
            rows = []
            for tag, r in rk.items():
                for loss in ("ice", "ce"):
                    v = r.get(loss, {})
                    rows.append([f"{loss} {tag} {r.get('shape')}"] + _cells(v, ("fwd_ms", "bwd_ms", "total_ms"))
                                + [r.get("copy_ms"), v.get("of_copy_2r1w")])
            out += ["", "## Row kernels alone (CUDA events)", "",
                    table(["case", "fwd ms", "bwd ms", "total ms", "copy_ ms", "of copy (2R+1W)"], rows)]
        gm = pr.get("gemm", {})
        if "error" not in gm:
            out += ["", f"bf16 GEMM {gm.get('shape')}: {gm.get('ms')} ms, {gm.get('tflops')} TFLOP/s"]
        ll = pr.get("linear_loss", {})
        if "error" not in ll:
            rows = [[k] + _cells(v, ("ms", "peak_mb", "extra_beyond_grads_mb")) for k, v in ll.items()
                    if isinstance(v, dict)]
            out += ["", f"## Fused linear ICE {ll.get('shape')} bf16 fwd+bwd (mixed-dtype addmm: "
                        f"{ll.get('mixed_mm_available')}; returned gradients {ll.get('returned_grads_mb')} MB)", "",
                    table(["chunk", "ms", "peak MB", "beyond the gradients MB"], rows)]
        ig = pr.get("inner_step_graph", {})
        if "error" not in ig:
            out += ["", "## Capturable inner step, Adam, 11.2M fp32", "",
                    table(["graph == eager", "graph replay ms", "eager capturable ms", "host step ms", "graph GB/s"],
                          [_cells(ig, ("graph_equals_eager", "graph_replay_ms", "eager_capturable_ms",
                                       "eager_host_step_ms", "graph_gbps"))])]
        failed = [k for k, v in pr.items() if isinstance(v, dict) and "error" in v]
        if failed:
            out += ["", "Parts that failed: " + "; ".join(f"{k}: {pr[k]['error'][:200]}" for k in failed)]
    return "\n".join(out)


def render(runs, previous: str = "", probes=()) -> str:
    """The whole file. A machine kind (CPU / GPU) with no JSON given keeps its section from
    ``previous`` (the file as it was), so a GPU-only run never drops the CPU tables."""
    kinds = {"CPU": [r for r in runs if not _is_gpu(r) and not _standalone(r)],
             "GPU": [r for r in runs if _is_gpu(r) and not _standalone(r)],
             **{t: [r for r in runs if _standalone(r) == t] for base in STANDALONE.values()
                for t in (base, f"{base} (GPU)")},
             PROBE_TITLE: list(probes)}
    parts = [HEADER]
    for title, rs in kinds.items():
        begin, end = _markers(title)
        if rs and title == PROBE_TITLE:
            body = render_probe(rs)
        elif rs:
            body = render_section(title, rs)
        elif begin in previous and end in previous:
            body = previous[previous.index(begin) + len(begin):previous.index(end)].strip("\n")
        elif title in EMPTY:
            body = EMPTY[title]
        else:
            continue                     # a GPU block never run: nothing to say
        parts.append(f"{begin}\n{body.rstrip()}\n{end}\n")
    return "\n".join(parts)


def short(run) -> str:
    """A terminal table: each group's fastest sophon_fast provider (or each engine mode) vs its baselines."""
    floors = {p["copy"]["extra_info"].get("device_type"): p["copy"]["extra_info"].get("GB/s")
              for p in groups(run, layer="copy_floor").values() if "copy" in p}
    lines = [caption(run).strip("_"), f"device copy floor GB/s: {floors}"]
    for g, p in groups(run).items():
        f = best_fast(p)
        if f is not None:
            b = p[f]
            gbs = b["extra_info"].get("GB/s")
            floor = floors.get(b["extra_info"].get("device_type", "cuda" if "cuda" in g else "cpu"))
            of_floor = f" = {100 * gbs / floor:.0f}% of copy floor" if gbs and floor else ""
            base = [f"{n} {ms(med(p[n]))}" for n in ("compile", "eager", "torch_foreach", "reference", "copy")
                    if n in p]
            lines.append(f"{g}: {f} {ms(med(b))} ms, {gbs} GB/s{of_floor} | " + ", ".join(base) + " ms")
        elif "fast" in p:
            tf, tr, tp = t_mode(p, "fast"), t_mode(p, "reference"), med(p.get("passes"))
            lines.append(f"{g}: fast {sec(tf)} s | reference {sec(tr)} s, passes {sec(tp)} s | speed-up "
                         f"{ratio(tr, tf)}, fast/passes {ratio(tf, tp)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="*",
                    help="pytest-benchmark JSON files (default: results/latest.json, results/gpu_*.json)")
    ap.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--short", action="store_true",
                    help="print a short table of the given JSON instead of writing --out")
    a = ap.parse_args(argv)
    paths = a.json or [p for p in [os.path.join(HERE, "results", "latest.json")]
                       + sorted(glob.glob(os.path.join(HERE, "results", "gpu_*.json"))) if os.path.exists(p)]
    if not paths:
        print("render_results: no JSON given and none in benchmarks/results/", file=sys.stderr)
        return 1
    loaded = [_load(p) for p in paths]
    runs, probes = [r for r in loaded if not is_probe(r)], [r for r in loaded if is_probe(r)]
    if a.short:
        print("\n\n".join([short(r) for r in runs] + ([render_probe(probes)] if probes else [])))
        return 0
    previous = open(a.out).read() if os.path.exists(a.out) else ""
    with open(a.out, "w") as f:
        f.write(render(runs, previous, probes))
    print(f"render_results: wrote {a.out} from {', '.join(paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
