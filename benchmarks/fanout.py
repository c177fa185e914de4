"""The release across machines: each job's disk, memory, time and Hub traffic, measured and computed.

    .venv/bin/python benchmarks/fanout.py                 # the per-runner table, computed (seconds)
    .venv/bin/python benchmarks/fanout.py --measure 1     # also run the jobs at Phi-3.5-MoE's real dimensions, 1 layer

--measure N takes a Phi-3.5-MoE-shaped bf16 checkpoint of N layers (benchmarks/rehearsal.py's) on the test Hub through
the release's jobs, each a process with a workspace of its own, one after another: the imatrix job (`moeq fetch`,
`moeq imatrix`), three quant jobs (`moeq build --quant Q --imatrix-from ARTIFACT --stage-to BRANCH`) and the
publish job (`moeq publish`, then `moeq push --check`). Printed per job: wall time, peak RSS (moeq's, the largest
tool's), peak disk beside `moeq doctor --job`'s peak, and what it sent to the test Hub (requests, bytes, LFS bytes
received).

The computed table is each job's disk by `moeq doctor`'s rule (plan_disk with --job) and its time and memory from
the per-layer costs measured on this machine (2 cores, 24 GiB; README "Performance": realdim.py and rehearsal.py),
scaled to a model by its F16 bytes per layer, for Phi-3.5-MoE and for a model of Qwen3-235B-A22B's dimensions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "benchmarks")]

from hub_server import TestHub  # noqa: E402
from realdim import measure  # noqa: E402
from rehearsal import PIPELINE, SOURCE_REPO, TOKEN, USER, _last_json, serve, write_checkpoint  # noqa: E402

from moeq.config import load_pipeline  # noqa: E402
from moeq.doctor import IMATRIX_JOB, plan_disk  # noqa: E402

MOEQ = [sys.executable, "-m", "moeq"]
BRANCH = "release-fanout"
LADDER = ("Q8_0", "Q4_K_M", "Q2_K")
GB = 1e9

# Models: parameters, layers, and the F16 bytes of one layer (experts, attention, norms, router).
PHI_LAYER_BYTES = 2 * (16 * 3 * 4096 * 6400 + 4096 * 4096 * 2 + 4096 * 1024 * 2)
MODELS = {
    "Phi-3.5-MoE (41.9B, 32 layers)": (41_900_000_000, 32, PHI_LAYER_BYTES),
    "Qwen3-235B-A22B dimensions (235B, 94 layers)": (235_000_000_000, 94,
                                                     2 * (128 * 3 * 4096 * 1536 + 4096 * 8192 * 2 + 4096 * 512 * 2)),
}
# Seconds on this machine per Phi-3.5-MoE layer (a) and fixed (b), least squares over 1 and 2 (fetch, imatrix,
# bench: rehearsal.py) or 1, 2 and 4 layers (quantize: realdim.py); README, "Performance".
STAGE_COST = {
    "fetch": (58.0, 44.0),  # download and convert
    "imatrix": (19.0, 3.0),  # 4 chunks of 512 tokens
    "quantize Q8_0": (10.0, 5.0), "quantize Q4_K_M": (47.2, 7.4), "quantize Q2_K": (33.5, 10.9),
    "bench Q8_0": (35.0, 10.0), "bench Q4_K_M": (143.0, -23.0), "bench Q2_K": (42.0, 61.0),
    "validate": (0.3, 2.5),
}
# A recipe search's seconds on this machine, per layer and fixed (benchmarks/recipe_realdim.py; README "Recipes"):
# its per-type files, the F16's logits on the selection text, one llama-perplexity run of 8,192 tokens with its
# candidate's assembly; and the runs it makes at 32 layers (`moeq recipe --plan` of pipeline.yaml). The per-type
# files with the importance matrix on the ladder of K and IQ types at 1 layer: Q2_K 565 s, Q4_K_M 287 s (their fixed
# part taken as before, 20 s); logits and runs as measured on the K ladder without a matrix, Q2_K at 1 and 2 layers:
# logits 33 and 82 s, a run 18.5 and 38.2 s; Q4_K_M at 1 layer a run 21.2 s (with the matrix and the IQ types again:
# 18.4 and 20.9 s, logits 35 and 34 s).
SEARCH_COST = {"files Q2_K": (545.0, 20.0), "files Q4_K_M": (267.0, 20.0), "logits": (48.3, -14.6),
               "run Q2_K": (19.7, -1.2), "run Q4_K_M": (22.4, -1.2)}
SEARCH_RUNS = {"Q4_K_M": 100, "Q2_K": 100}
TOOL_RSS_MB = (2318.0, 1232.0)  # the largest llama.cpp tool's peak RSS per layer and fixed (rehearsal.py)
WITH_CHOICE = {"Q4_K_M", "Q2_K"}  # imatrix: auto, so the choice quantizes twice
SEARCHED = {"Q4_K_M", "Q2_K"}  # recipe: search, so the choice has a third candidate
UPLOAD_BPS = 1e9 / 8  # 1 Gbit/s to the Hub, for the pushes (an assumption, not a measurement)


def cost(stage: str, layers: int, scale: float, table: dict = STAGE_COST) -> float:
    per_layer, fixed = table[stage]
    return max(0.0, per_layer * layers * scale + fixed)


def search_seconds(quant: str, layers: int, scale: float) -> float:
    """A searched rung's recipe stage: its per-type files, the F16 logits, its runs; 0 for a stock rung."""
    if quant not in SEARCHED:
        return 0.0
    return (cost(f"files {quant}", layers, scale, SEARCH_COST) + cost("logits", layers, scale, SEARCH_COST)
            + SEARCH_RUNS[quant] * cost(f"run {quant}", layers, scale, SEARCH_COST))


def job_seconds(quant: str, layers: int, scale: float, quant_bytes: int) -> float:
    """A quant's own stages after the fetch: its search, quantize (once per candidate of the choice: with and
    without the importance matrix, the searched recipe), validate, bench, its upload."""
    candidates = 1 + (quant in WITH_CHOICE) + (quant in SEARCHED)
    return (search_seconds(quant, layers, scale) + cost(f"quantize {quant}", layers, scale) * candidates
            + cost("validate", layers, scale) + cost(f"bench {quant}", layers, scale) + quant_bytes / UPLOAD_BPS)


def computed_table() -> None:
    pipeline = load_pipeline(REPO / "pipeline.yaml")
    print("| model | job | disk (doctor's rule) | largest tool's RSS | time on 2 cores |")
    print("| --- | --- | --- | --- | --- |")
    for name, (params, layers, layer_bytes) in MODELS.items():
        scale = layer_bytes / PHI_LAYER_BYTES
        model = dataclasses.replace(pipeline.model, parameters=params)
        shaped = dataclasses.replace(pipeline, model=model)
        rss = (TOOL_RSS_MB[0] * layers * scale + TOOL_RSS_MB[1]) / 1000
        fetch, imatrix = cost("fetch", layers, scale), cost("imatrix", layers, scale)
        sizes = {q: item[1] for q in LADDER for item in plan_disk(shaped, [q]).items if item[0] == shaped.quant(q).file}
        rows = [("imatrix", plan_disk(shaped, [IMATRIX_JOB]).peak_bytes, fetch + imatrix)]
        rows += [(f"quant {q}", plan_disk(shaped, [q]).peak_bytes, fetch + job_seconds(q, layers, scale, sizes[q]))
                 for q in LADDER]
        one = fetch + imatrix + sum(job_seconds(q, layers, scale, sizes[q]) for q in LADDER)
        fanned = fetch + imatrix + max(s for label, _d, s in rows[1:]) + 10  # + the publish: a commit, no upload
        critical = max(rows[1:], key=lambda row: row[2])[0]
        for label, disk, seconds in rows:
            search = search_seconds(label.removeprefix("quant "), layers, scale)
            note = f" (the search {search / 3600:.1f} h)" if search else ""
            mark = " **(critical path)**" if label == critical else ""
            print(f"| {name} | {label}{mark} | {disk / GB:,.0f} GB | {rss:,.0f} GB | {seconds / 3600:.1f} h{note} |")
        print(f"| {name} | publish | under 1 MB (card, manifest, charts) | under 0.3 GB | under 1 min |")
        print(f"| {name} | one runner, today: every stage | {plan_disk(shaped).peak_bytes / GB:,.0f} GB | {rss:,.0f} GB "
              f"| {one / 3600:.1f} h |")
        print(f"| {name} | three runners: the release's wall time | | | {fanned / 3600:.1f} h "
              f"({fanned / one:.2f} of one runner's) |")


def run_job(name: str, command: list[str], folder: Path, hub: TestHub) -> dict:
    start, lfs = len(hub.requests), hub.state.lfs_bytes_received
    run = measure(command, disk=folder, cwd=folder)
    sent = hub.requests[start:]
    summary = _last_json(run.out) if " build " in f" {' '.join(command)} " else None
    stages = {s["stage"]: s["seconds"] for s in summary["quants"][0]["stages"]} if summary else {}
    return {"job": name, "stages": stages, "wall_s": round(run.wall_s, 1), "moeq_rss_mb": round(run.moeq_rss_mb),
            "tools_rss_mb": round(run.tools_rss_mb), "peak_disk_gb": round(run.disk_used_gb, 2),
            "requests": len(sent), "writes": sum(1 for r in sent if r.writes),
            "sent_bytes": sum(r.body_bytes for r in sent), "lfs_bytes": hub.state.lfs_bytes_received - lfs,
            "ok": "error:" not in run.out, "out": run.out[-1500:]}


def doctor_peak(config: Path, job: str) -> float | None:
    proc = subprocess.run(MOEQ + ["doctor", "--config", str(config), "--job", job, "--json"], cwd=config.parent,
                          capture_output=True, text=True)
    peak = json.loads(proc.stdout)["disk"].get("peak_bytes")
    return round(peak / GB, 2) if peak else None


def measured(layers: int, root: Path) -> list[dict]:
    from dataclasses import replace

    import numpy as np

    from moeq.synth import PRESETS
    from moeq.synth_hf import checkpoint_layout

    write_checkpoint(root / "checkpoint", layers)
    hub = TestHub({TOKEN: USER})
    jobs = []
    try:
        commit = serve(hub, root / "checkpoint")
        _arch, spec = PRESETS["phi-3.5-moe"]
        parameters = sum(int(np.prod(shape)) for _n, shape, _f in checkpoint_layout(replace(spec, layers=layers)))
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(root / "hf-home"),
               "HF_HUB_DISABLE_TELEMETRY": "1"}
        import os

        os.environ.update(env)

        def config(job: str) -> Path:
            folder = root / job
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "pipeline.yaml"
            path.write_text(PIPELINE.format(layers=layers, source_repo=SOURCE_REPO, commit=commit, user=USER,
                                            workspace=folder / "work", parameters=parameters))
            return path

        cfg = config("imatrix")
        jobs.append(run_job("imatrix: fetch", MOEQ + ["fetch", "--config", str(cfg), "--json"], cfg.parent, hub))
        jobs.append(run_job("imatrix", MOEQ + ["imatrix", "--config", str(cfg), "--json"], cfg.parent, hub))
        jobs[-1]["doctor_gb"] = doctor_peak(cfg, IMATRIX_JOB)
        artifact = root / "artifact"
        (artifact / "records").mkdir(parents=True, exist_ok=True)
        shutil.copy(cfg.parent / "work" / "records" / "imatrix.json", artifact / "records")
        (artifact / "imatrix").mkdir(exist_ok=True)
        for made in (cfg.parent / "work" / "imatrix").glob("*.imatrix"):
            shutil.copy(made, artifact / "imatrix")
        shutil.rmtree(cfg.parent / "work" / "source")  # the runner is given back
        for quant in LADDER:
            cfg = config(f"quant-{quant}")
            jobs.append(run_job(f"quant {quant}", MOEQ + ["build", "--config", str(cfg), "--quant", quant,
                                                          "--imatrix-from", str(artifact), "--stage-to", BRANCH,
                                                          "--json"], cfg.parent, hub))
            jobs[-1]["doctor_gb"] = doctor_peak(cfg, quant)
            shutil.rmtree(cfg.parent / "work")
        cfg = config("publish")
        jobs.append(run_job("publish", MOEQ + ["publish", "--config", str(cfg), "--from-branch", BRANCH, "--json"],
                            cfg.parent, hub))
        check = subprocess.run(MOEQ + ["push", "--config", str(cfg), "--check"], cwd=cfg.parent, capture_output=True,
                               text=True)
        jobs[-1]["check_ok"] = check.returncode == 0
    finally:
        hub.close()
    return jobs


def report(jobs: list[dict]) -> None:
    print("| job | wall s | moeq / largest tool peak RSS MB | peak disk GB | doctor --job GB | requests (writes) | "
          "bytes sent | LFS bytes received |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for j in jobs:
        print(f"| {j['job']} | {j['wall_s']} | {j['moeq_rss_mb']} / {j['tools_rss_mb']} | {j['peak_disk_gb']} | "
              f"{j.get('doctor_gb', '')} | {j['requests']} ({j['writes']}) | {j['sent_bytes']:,} | {j['lfs_bytes']:,} |")
    for j in jobs:
        if j.get("stages"):
            print(f"{j['job']}: " + ", ".join(f"{k} {v:.0f} s" for k, v in j["stages"].items() if v))
        if not j["ok"]:
            print(f"{j['job']} FAILED: {j['out']}")
    print(f"push --check after the publish: {'passed' if jobs[-1].get('check_ok') else 'FAILED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--measure", type=int, metavar="LAYERS", help="also run the jobs at this many real layers")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    computed_table()
    if args.measure:
        root = args.dir or Path(tempfile.mkdtemp(prefix="moeq-fanout-"))
        jobs = measured(args.measure, root)
        print()
        report(jobs)
        (root / "fanout.json").write_text(json.dumps(jobs, indent=1))


if __name__ == "__main__":
    main()
