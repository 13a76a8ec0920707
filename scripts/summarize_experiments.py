"""Markdown rows for docs/experiments.md from runs/exp/NAME/s*.json (scripts/experiment.py output).

    .venv/bin/python scripts/summarize_experiments.py NAME [NAME ...] [--per-seed] [--targets]

--per-seed: one column of overheads per seed; --targets: the protection-strength issue's targets checked
on the medians (original accuracy within 2 points, overhead >= 1.5, head start removed >= 0.9, paper attack
within 2 points of scratch at every epoch).
"""
import glob
import json
import statistics
import sys


def fmt(v, pct=True):
    if v is None:
        return "–"
    return f"{100 * v:.1f}" if pct else f"{v:.2f}"


def ov_str(x):
    return "∞" if x["never_reached"] else f"{x['overhead']:.2f}"


def per_seed(runs):
    print("\n| attack | " + " | ".join(f"s{r['seed']} overhead (prot / scratch)" for r in runs) + " |")
    print("| --- |" + " --- |" * len(runs))
    print("| original accuracy | " + " | ".join(
        f"{fmt(r['original_acc']['unprotected'])} → {fmt(r['original_acc']['protected'])}" for r in runs) + " |")
    for i, a in enumerate(runs[0]["attacks"]):
        print(f"| {a['attack']} | " + " | ".join(
            f"{ov_str(r['attacks'][i])} ({fmt(r['attacks'][i]['protected'][-1])} / {fmt(r['attacks'][i]['scratch'][-1])})"
            for r in runs) + " |")


def targets(runs):
    drop = statistics.median(r["original_acc"]["unprotected"] - r["original_acc"]["protected"] for r in runs)
    out = [("original accuracy within 2 points (median drop)", drop <= 0.02, f"{100 * drop:.1f} points")]
    for i, a in enumerate(runs[0]["attacks"]):
        rows = [r["attacks"][i] for r in runs]
        ov = statistics.median(float("inf") if x["never_reached"] else x["overhead"] for x in rows)
        sc = statistics.median(x["scratch"][-1] for x in rows)
        note = " (scratch ends at %.1f%%: metric degenerate)" % (100 * sc) if sc < 0.2 else ""
        if not a["attack"].startswith("paper"):
            out.append((f"{a['attack']}: overhead >= 1.5{note}", ov >= 1.5, "∞" if ov == float("inf") else f"{ov:.2f}"))
        hs = [x["head_start_removed"] for x in rows if x["head_start_removed"] is not None]
        if hs:
            h = statistics.median(hs)
            out.append((f"{a['attack']}: head start removed >= 0.9", h >= 0.9, f"{h:.2f} (over {len(hs)} seeds)"))
        if a["attack"].startswith("paper"):
            ex = statistics.median(x["max_excess_over_scratch"] for x in rows)
            out.append((f"{a['attack']}: within 2 points of scratch at every epoch (median of max excess)",
                        ex <= 0.02, f"{100 * ex:+.1f} points"))
    met = sum(ok for _, ok, _ in out)
    print(f"\nTargets on the medians: {met} of {len(out)} met.\n")
    for t, ok, v in out:
        print(f"- {'met' if ok else '**missed**'}: {t}: {v}")


def main(argv):
    names = [a for a in argv if not a.startswith("--")]
    for name in names:
        runs = [json.load(open(p)) for p in sorted(glob.glob(f"runs/exp/{name}/s*.json"))]
        if not runs:
            print(f"no results for {name}")
            continue
        seeds = ",".join(str(r["seed"]) for r in runs)
        oa = statistics.median(r["original_acc"]["protected"] for r in runs)
        ou = statistics.median(r["original_acc"]["unprotected"] for r in runs)
        print(f"\n**{name}** (seeds {seeds}; protect {statistics.median(r['protect_seconds'] for r in runs):.0f} s; "
              f"original acc {fmt(ou)} → {fmt(oa)})\n")
        print("| attack | protected | unprotected | scratch | overhead | head start removed | max excess over scratch |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for i, a in enumerate(runs[0]["attacks"]):
            rows = [r["attacks"][i] for r in runs]
            med = lambda k: statistics.median(x[k][-1] for x in rows)  # noqa: E731
            ovs = [float("inf") if x["never_reached"] else x["overhead"] for x in rows]
            ov = statistics.median(ovs)
            hs = [x["head_start_removed"] for x in rows if x["head_start_removed"] is not None]
            ex = statistics.median(x["max_excess_over_scratch"] for x in rows)
            print(f"| {a['attack']} | {fmt(med('protected'))} | {fmt(med('unprotected'))} | {fmt(med('scratch'))} | "
                  f"{'∞' if ov == float('inf') else f'{ov:.2f}'} | {fmt(statistics.median(hs), False) if hs else '–'} | "
                  f"{100 * ex:+.1f} |")
        if "--per-seed" in argv:
            per_seed(runs)
        if "--targets" in argv:
            targets(runs)


if __name__ == "__main__":
    main(sys.argv[1:])
