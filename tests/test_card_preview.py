"""`moeq card preview`: the staged card as a standalone HTML page."""

from __future__ import annotations

from conftest import run_moeq

# ---------------------------------------------------------------- preview


def test_preview_writes_html_outside_the_staged_repo(carded_ladder, carded_per_quant):
    pipeline, ws, _ = carded_ladder
    proc = run_moeq("card", "preview", "--config", str(pipeline.path))
    assert proc.returncode == 0, proc.stderr
    html = (ws.root / "previews" / "ladder.html").read_text()
    assert "<table>" in html and "<h1>tiny-phimoe GGUF" in html
    assert '<a href="https://huggingface.co/moeq-test/tiny-phimoe-GGUF/resolve/main/tiny-phimoe-Q2_K.gguf">' in html
    assert '<span class="tag">gguf</span>' in html
    inside = ws.repo_dir(None) / "preview.html"
    proc = run_moeq("card", "preview", str(ws.repo_dir(None) / "README.md"), "--out", str(inside))
    assert proc.returncode == 7 and not inside.exists()
    pipeline, ws, _ = carded_per_quant
    proc = run_moeq("card", "preview", "--config", str(pipeline.path), "--quant", "Q4_K_M")
    assert proc.returncode == 0, proc.stderr
    html = (ws.root / "previews" / "Q4_K_M.html").read_text()
    assert "<h1>tiny-phimoe Q4_K_M GGUF" in html
    assert '<a href="https://huggingface.co/moeq-test/tiny-phimoe-q8-0-gguf">' in html
