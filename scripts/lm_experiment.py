"""One language-model protection experiment: protect the LM demo's pre-trained GPT-2 against Python with
``sophon_fast.recipes.language_model`` (+ JSON overrides), attack it with the demo's attacks, and print the gaps.

    .venv/bin/python scripts/lm_experiment.py NAME [--quick] [--set '{"iterations": 240}'] [--threads 1]

Writes runs/lm/NAME.json (the protected model: runs/lm/NAME_model, save_pretrained): the settings, protect time, stop reason, the restricted loss before the attacks and
the demo's report (``lm_demo.attack_all``). Prints one line per attack: protected minus scratch restricted loss
at each evaluation (the issue's target is >= 0 everywhere), and the English loss against the unprotected model.
The pre-trained model and tokenizer are cached under --cache (docs/domains.md, "Language models").
"""
import argparse
import copy
import json
import os
import time

import torch

import sophon_fast as sf
from sophon_fast import recipes
from sophon_fast.apps import lm_demo
from sophon_fast._atomic import atomic_path
from sophon_fast.tasks.lm import LanguageModelTask


def gaps(report):
    """[(attack name, [protected - scratch per evaluation])]."""
    return [(a["name"], [p - s for p, s in zip(a["protected"], a["scratch"])]) for a in report["attacks"]]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--set", default="{}", help="JSON overrides of sophon_fast.recipes.language_model")
    p.add_argument("--cache", default="runs/lm_cache")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default=None, help="attack this saved protected model (save_pretrained) instead of "
                                                 "protecting; --set is then only recorded")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs("runs/lm", exist_ok=True)
    prep = lm_demo.prepare(a.quick, 0, a.cache)
    settings = {**recipes.language_model(a.quick).to_dict(), **json.loads(a.set)}
    if a.model:
        from transformers import GPT2LMHeadModel
        finish(a, prep, GPT2LMHeadModel.from_pretrained(a.model),
               {"settings": settings, "protect_seconds": 0.0, "stop": f"loaded {a.model}"})
        return
    unrolled = settings.get("meta_gradient") == "unrolled"
    task = LanguageModelTask(second_order=unrolled)
    model = copy.deepcopy(prep.model)
    if unrolled:        # twice-differentiable losses and attention (docs of LanguageModelTask)
        model.set_attn_implementation("eager")
    t0 = time.perf_counter()
    res = sf.protect(model, prep.original_train, prep.restricted_train,
                     sf.ProtectConfig.from_dict({**settings, "progress": False, "in_place": True}), task=task,
                     original_test=prep.original_test)
    seconds = time.perf_counter() - t0
    res.model.set_attn_implementation(prep.model.config._attn_implementation)   # the attacks run as on the others
    res.model.save_pretrained(f"runs/lm/{a.name}_model")
    finish(a, prep, res.model, {"settings": settings, "protect_seconds": seconds, "stop": res.stop_reason})


def finish(a, prep, model, info):
    """Attack ``model`` with the demo's attacks; write runs/lm/NAME.json and print the gaps."""
    task = LanguageModelTask()
    before = task.evaluate(model, task.prepare(model, prep.restricted_test, "restricted test"))
    print(f"[{a.name}] protect {info['protect_seconds']:.0f} s, stop {info['stop']}, restricted loss before attacks "
          f"{before:.3f}", flush=True)
    report = lm_demo.attack_all(model, prep, a.quick, 0)
    out = {"name": a.name, "quick": a.quick, **info, "restricted_before_attack": before, "report": report}
    with atomic_path(f"runs/lm/{a.name}.json") as tmp:
        tmp.write_text(json.dumps(out))
    o = report["original"]
    print(f"[{a.name}] English loss {o['unprotected']:.3f} -> {o['protected']:.3f} "
          f"({100 * (o['protected'] / o['unprotected'] - 1):+.1f}%)")
    for name, g in gaps(report):
        print(f"[{a.name}] {name:24s} gap " + " ".join(f"{x:+.2f}" for x in g))


if __name__ == "__main__":
    main()
