"""The steps of a build, each one stage wired to the records it is given.

    context.py    Context: what one command works with (pipeline, workspace, records, tools, Hub)
    wiring.py     one function per stage: its Stage declared from the records it is handed, run once
    candidates.py the choice's candidates of a rung: which, how each is made, and why a rung has no choice
    policy.py     when a validation or a bench fails the quant
    repos.py      which Hub repo each quant goes to, what its card lists, the read-only push checks
    release.py    a release across machines: a quant staged on a branch, an imported importance matrix

No function here calls another stage's function: plan.py (the one orchestrator) runs them in order and
hands each the records of the steps it needs.
"""
