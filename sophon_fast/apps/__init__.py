"""Applications of the library, outside its core: the demos, their reports and the quick speed check.

    demo, lm_demo, diffusion_demo, task_demos   ``sophon-fast demo [--task image|lm|diffusion]``
    pipeline                                    the demos' cached protect stage
    report                                      report.json / report.md / curves.png (``sophon-fast report``)
    experiments                                 experiments/ID/ as data: the runner and the generated results table
    quickbench                                  ``sophon-fast bench``
    user                                        ``sophon-fast protect|attack`` on the user's own model and data
    audit                                       ``sophon-fast audit`` (sophon_fast.audit)

Nothing in the core (engine, tasks, attacks, ops, models, data, io, defences, recipes) imports from here
(tests/test_layering.py).
"""
