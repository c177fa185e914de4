"""The `moeq` command line: each command parses its options, makes one library call and renders the result.

One module per command (card and synth are families with subcommands), registered below in the order a
user meets them, which is the order `moeq --help` lists them in. Errors are MoeqError subclasses, said
once by the error boundary in app.py.
"""

from moeq.cli import (bench, build, card, check_config, compare, doctor, fetch, imatrix, plan, publish, push, quantize,
                      recipe, synth, validate)
from moeq.cli.app import app, register

COMMANDS = (
    ("build", build.build), ("fetch", fetch.fetch), ("imatrix", imatrix.imatrix), ("recipe", recipe.recipe),
    ("quantize", quantize.quantize),
    ("validate", validate.validate), ("bench", bench.bench), ("compare", compare.compare), ("card", card.card_app), ("push", push.push),
    ("publish", publish.publish),
    ("plan", plan.plan), ("check-config", check_config.check_config), ("doctor", doctor.doctor),
    ("synth", synth.synth_app),
)
for _name, _command in COMMANDS:
    register(_name, _command)

__all__ = ["app", "COMMANDS"]
