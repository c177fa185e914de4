"""The one orchestrator (moeq/plan.py): an up-to-date `moeq build --all` of the example makes one stage-runner call
per stage result and reads each record once; every command runs the plan cut at its target."""

from __future__ import annotations

import collections

import pytest

from moeq import record_store
from moeq.build import build
from moeq.config import load_pipeline
from moeq.plan import CANDIDATE, plan
from moeq.steps import release, wiring
from moeq.steps.context import Context

from conftest import copy_built, pipeline_file


@pytest.fixture(scope="module")
def example(tmp_path_factory, example_built):
    """A copy of the example's ladder built with `moeq build --all`."""
    folder = tmp_path_factory.mktemp("orchestrator")
    copy_built(example_built, folder)
    return load_pipeline(folder / "tiny-phimoe.yaml")


@pytest.mark.slow
def test_an_up_to_date_build_makes_one_runner_call_per_stage_and_reads_each_record_once(example, monkeypatch):
    calls, loads = collections.Counter(), collections.Counter()
    real_run_stage, real_load = wiring.run_stage, record_store.load_saved

    def counted_run_stage(stage, records, **kwargs):
        calls[(stage.name, stage.subject)] += 1
        return real_run_stage(stage, records, **kwargs)

    def counted_load(path, cls):
        loads[path.name] += 1
        return real_load(path, cls)

    for module in (wiring, release):
        monkeypatch.setattr(module, "run_stage", counted_run_stage)
    monkeypatch.setattr(record_store, "load_saved", counted_load)
    summary = build(Context.of(example), list(example.quants), push=False)
    assert summary.ok
    assert {s.status for q in summary.quants for s in q.stages} == {"up to date", "skipped"}
    records = sorted(p.name for p in example.workspace.joinpath("records").iterdir())
    assert len(records) == 21  # fetch, imatrix, 4 candidates, 2 choices, and 3 x quantize, validate, bench, shards; card
    assert sorted(f"{stage}-{subject}.json" if subject else f"{stage}.json" for stage, subject in calls) == records
    assert set(calls.values()) == {1}, calls
    # each record read once; the card also looks once for those a quant may have (push, recipe, Q8_0's choice)
    assert set(records) <= set(loads) and set(loads.values()) == {1}, loads


def test_each_command_runs_the_plan_cut_at_its_target(tmp_path):
    pipeline = load_pipeline(pipeline_file(tmp_path, trained=False))
    ctx = Context.of(pipeline)
    q2 = [pipeline.quant("Q2_K")]
    assert [s.id for s in plan(ctx, q2, "fetch")] == [("fetch", None)]
    assert [s.id for s in plan(ctx, q2, "imatrix")] == [("fetch", None), ("imatrix", None)]
    made = [(CANDIDATE, "Q2_K-with-imatrix"), (CANDIDATE, "Q2_K-without-imatrix")]
    assert [s.id for s in plan(ctx, q2, "quantize")] == [("fetch", None), ("imatrix", None), *made,
                                                          ("choice", "Q2_K"), ("quantize", "Q2_K")]
    assert [s.id for s in plan(ctx, q2, "bench")][-3:] == [("quantize", "Q2_K"), ("validate", "Q2_K"), ("bench", "Q2_K")]
    # the card needs the file and its shards, not its validation or bench (read where they are there)
    carded = [s.id for s in plan(ctx, q2, "card")]
    assert carded[-3:] == [("quantize", "Q2_K"), ("shards", "Q2_K"), ("card", None)]
    assert ("validate", "Q2_K") not in carded and ("bench", "Q2_K") not in carded
    whole = plan(ctx, list(pipeline.quants))
    assert [s.id for s in whole][-2:] == [("card", None), ("push", None)]
    for step in whole:  # a step takes only records of steps before it
        before = {s.id for s in whole[:whole.index(step)]}
        assert set(step.needs) <= before and set(step.after) <= before, step.id
