"""Markdown rows for docs/experiments.md from runs/exp/NAME/s*.json (scripts/experiment.py output).

    .venv/bin/python scripts/summarize_experiments.py NAME [NAME ...]
"""
import glob
import json
import statistics
import sys


def fmt(v, pct=True):
    if v is None:
        return "–"
    return f"{100 * v:.1f}" if pct else f"{v:.2f}"


def main(names):
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


if __name__ == "__main__":
    main(sys.argv[1:])
