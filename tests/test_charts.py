"""The cards' charts (matplotlib, from the records manifest) and the card preview opened in headless Chromium.

The example ladder is built with its bench (through the RPC device) and the trained tiny model, so both
charts have measured figures: buffers on the offload device, and KL divergence with and without the
importance matrix. The Chromium screenshot is kept under pytest's temporary folder; the test prints its path.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from moeq.manifest import read_manifest
from moeq.units import binary_size, decimal_size

from conftest import PER_QUANT, copy_built, example_section, pipeline_file, run_moeq

LADDER = ("Q8_0", "Q4_K_M", "Q2_K")


def example(folder: Path, rpc_device: str, layout: str = "single") -> Path:
    return pipeline_file(folder, rpc=rpc_device, **({"hub": PER_QUANT} if layout == "per-quant" else {}))


@pytest.fixture(scope="module")
def built(tmp_path_factory, example_built):
    folder = tmp_path_factory.mktemp("charts")
    copy_built(example_built, folder)  # built already: this build is up to date, and prints its summary
    config = folder / "tiny-phimoe.yaml"
    proc = run_moeq("build", "--config", str(config), "--all")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return config, config.parent / "work", proc.stdout


def pixels(path: Path) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(path)


def test_both_charts_are_drawn_published_and_listed(built):
    _, ws, stdout = built
    folder = ws / "repos" / "ladder"
    manifest = read_manifest(folder / "moeq-manifest.json")
    assert {"images/gpu-memory.png", "images/quality-size.png"} <= set(manifest.repo_files)
    text = (folder / "README.md").read_text()
    for name in ("gpu-memory", "quality-size"):
        image = pixels(folder / "images" / f"{name}.png")
        assert image.shape[:2] == (450, 800)  # 800 x 450 px
        assert float(image[..., :3].var()) > 0.005  # not blank
        assert f"](https://huggingface.co/moeq-test/tiny-phimoe-GGUF/resolve/main/images/{name}.png)" in text
    # The build summary says where the charts and the preview are.
    flat = stdout.replace("\n", "")
    assert f"charts in {ws / 'repos'}/ladder/images/" in flat and f"previews: {ws / 'previews'}/ladder.html" in flat
    assert (ws / "previews" / "ladder.html").is_file()


def test_the_alt_texts_state_the_records_figures(built):
    _, ws, _ = built
    folder = ws / "repos" / "ladder"
    manifest = read_manifest(folder / "moeq-manifest.json")
    text = (folder / "README.md").read_text()
    memory_alt = re.search(r"!\[(GPU memory against -ncmoe N\.[^\]]*)\]", text).group(1)
    quality_alt = re.search(r"!\[(Mean KL divergence against F16 by file size\.[^\]]*)\]", text).group(1)
    for entry in manifest.quants:
        plan = entry.records.validate_.plan
        assert (f"{entry.quant}: {binary_size(plan.placement(0).gpu_bytes)} of weights on the GPU with every layer "
                f"there, {binary_size(plan.placement(plan.n_layer).gpu_bytes)} with --cpu-moe, plus "
                f"{binary_size(plan.kv_bytes[512])} of KV cache at context 512, measured on the offload device "
                "too") in memory_alt
        quality = entry.records.bench.quality
        size = decimal_size(sum(f.size for f in entry.files))
        assert f"{entry.quant} ({size}) {quality.quant.kld_mean:.6f}" in quality_alt
        if entry.quant != "Q8_0":  # the choice's other candidate too (with or without the importance matrix)
            [other] = entry.records.choice.others()
            assert (f"{other.quality.kld_mean:.6f} {other.name} ({decimal_size(other.file.size)}, not published)"
                    in quality_alt)


def test_a_rebuild_draws_the_same_bytes_and_pushes_nothing(built, tmp_path):
    config, ws, _ = built
    folder = ws / "repos" / "ladder" / "images"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    proc = run_moeq("card", "--config", str(config), "--force", "--json")
    assert proc.returncode == 0, proc.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    # Drawn again from the published manifest alone, in another process: the same bytes.
    from moeq.cards.charts import charts, draw

    manifest = read_manifest(ws / "repos" / "ladder" / "moeq-manifest.json")
    assert {Path(c.path).name: draw(manifest, c) for c in charts(manifest)} == before


def test_an_image_the_repo_will_not_hold_is_a_finding(built, tmp_path):
    _, ws, _ = built
    folder = ws / "repos" / "ladder"
    copy = tmp_path / "card"
    copy.mkdir()
    shutil.copy(folder / "moeq-manifest.json", copy / "moeq-manifest.json")
    text = (folder / "README.md").read_text().replace("images/quality-size.png", "images/quality.png")
    (copy / "README.md").write_text(text)
    proc = run_moeq("card", "lint", str(copy / "README.md"))
    assert proc.returncode == 7
    assert "unknown-file: links images/quality.png (an image or file) in this repo, which it will not hold" in proc.stdout
    assert run_moeq("card", "verify", str(copy / "README.md")).returncode == 7


@pytest.mark.slow
def test_per_quant_cards_get_the_charts_that_show_something(tmp_path, toolchain, rpc_device):
    config = example(tmp_path, rpc_device, layout="per-quant")
    proc = run_moeq("build", "--config", str(config), "--quant", "Q2_K", "--skip-bench")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    folder = tmp_path / "work" / "repos" / "Q2_K"
    text = (folder / "README.md").read_text()
    assert (folder / "images" / "gpu-memory.png").is_file()
    assert "](https://huggingface.co/moeq-test/tiny-phimoe-q2-k-gguf/resolve/main/images/gpu-memory.png)" in text
    # No bench, so no KL divergence: no quality chart (empty axes are not published), staged or linked.
    assert not (folder / "images" / "quality-size.png").exists() and "quality-size" not in text
    manifest = read_manifest(folder / "moeq-manifest.json")
    assert "images/quality-size.png" not in manifest.repo_files
    assert run_moeq("card", "lint", str(folder / "README.md")).returncode == 0


# ---------------------------------------------------------------- the preview in a real browser


def chromium(*args: str) -> subprocess.CompletedProcess:
    browser = shutil.which("chromium")
    if browser is None:
        pytest.fail("chromium is missing: run scripts/setup")
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                           "--virtual-time-budget=5000", *args], capture_output=True, text=True, timeout=120)


def console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def test_the_preview_opens_in_chromium_with_its_tables_and_images(built, tmp_path):
    _, ws, _ = built
    page = ws / "previews" / "ladder.html"
    shot = tmp_path / "preview.png"
    proc = chromium("--window-size=1200,3200", f"--screenshot={shot}", page.as_uri())
    assert shot.is_file(), proc.stderr[-2000:]
    assert console_messages(proc.stderr) == []  # no script error, and every image loaded
    image = pixels(shot)
    assert image.shape[:2] == (3200, 1200) and float(image[..., :3].var()) > 0.01
    print(f"\nscreenshot of the example card: {shot}")
    dom = chromium("--dump-dom", page.as_uri()).stdout
    assert dom.count("<table>") >= 5 and "<td>Q4_K_M</td>" in dom
    assert dom.count('src="../repos/ladder/images/') == 2  # from the staged folder, not the Hub
    # A missing image is what the browser reports.
    (ws / "repos" / "ladder" / "images" / "quality-size.png").rename(tmp_path / "aside.png")
    try:
        proc = chromium("--window-size=1200,800", f"--screenshot={tmp_path / 'broken.png'}", page.as_uri())
        assert [m.split('"')[1] for m in console_messages(proc.stderr)] == [
            "image did not load: ../repos/ladder/images/quality-size.png"]
    finally:
        (tmp_path / "aside.png").rename(ws / "repos" / "ladder" / "images" / "quality-size.png")


INJECTED = {
    "name": "<script>console.error('injected name')</script>tiny",
    "quantized_by": "<img src=x onerror=\"console.error('injected img')\">",
    "license": "mit <b onmouseover=alert(1)>x</b>",
}


@pytest.mark.slow
def test_script_in_the_pipeline_stays_text_in_the_card_and_the_preview(tmp_path, toolchain, rpc_device):
    """Values from the pipeline are text: escaped in README.md, shown as text in the preview, never run; a citation
    with backticks cannot close its code fence."""
    card = example_section("card")
    citation = card["extra"]["citation"]
    assert "  primaryClass={cs.CL}\n" in citation
    card["extra"]["citation"] = citation.replace("  primaryClass={cs.CL}\n", "  primaryClass={cs.CL}\n```\n<script>"
                                                 "console.error('injected citation')</script>\n" + "`" * 30_000 + "\n")
    config = pipeline_file(tmp_path, rpc=rpc_device, card=card,
                           model={**example_section("model"), **{key: INJECTED[key]
                                                                 for key in ("name", "quantized_by", "license")}},
                           hub={**example_section("hub"), "repo": "moeq-test/tiny-phimoe-GGUF"})
    proc = run_moeq("build", "--config", str(config), "--quant", "Q8_0", "--skip-bench")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    card = tmp_path / "work" / "repos" / "ladder" / "README.md"
    body = card.read_text().split("\n---\n", 1)[1]
    fence = "`" * 30_001  # longer than any run of backticks in the citation
    before, citation, after = body.partition(fence + "bibtex\n")[0], *body.partition(fence + "bibtex\n")[2].split(
        "\n" + fence + "\n", 1)
    assert "<script>console.error('injected citation')</script>" in citation  # code: shown as it is
    for outside in (before, after):
        assert "<script" not in outside and "<img" not in outside and "<b " not in outside
    assert "&lt;script&gt;console.error('injected name')&lt;/script&gt;tiny GGUF" in before
    assert run_moeq("card", "lint", str(card)).returncode == 0
    assert run_moeq("card", "verify", str(card)).returncode == 0
    page = tmp_path / "work" / "previews" / "ladder.html"
    proc = chromium("--dump-dom", page.as_uri())
    assert not [m for m in console_messages(proc.stderr) if "injected" in m], proc.stderr[-2000:]
    assert "&lt;script&gt;console.error('injected name')&lt;/script&gt;tiny GGUF" in proc.stdout
    # A hand-written card with raw HTML: lint names it, and the preview does not run it.
    hostile = tmp_path / "hostile" / "README.md"
    hostile.parent.mkdir()
    hostile.write_text(card.read_text().replace("tiny GGUF", "tiny GGUF <script>console.error('injected raw')</script>"
                                                "<img src=x onerror=\"console.error('injected raw img')\">", 1))
    proc = run_moeq("card", "lint", str(hostile))
    assert proc.returncode == 7 and "raw-html: HTML <script> that the template does not write" in proc.stdout
    assert "raw-html: HTML <img> that the template does not write" in proc.stdout
    assert run_moeq("card", "preview", str(hostile), "--out", str(tmp_path / "hostile.html")).returncode == 0
    proc = chromium("--dump-dom", (tmp_path / "hostile.html").as_uri())
    assert not [m for m in console_messages(proc.stderr) if "injected" in m], proc.stderr[-2000:]
