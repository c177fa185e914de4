"""`moeq card verify`: a card rendered again from its records manifest, and every line that differs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from moeq.manifest import MANIFEST_NAME

from conftest import REPO, run_moeq
from cards_support import card_text



def _staged_copy(ws, quant: str | None, folder: Path, edit=lambda t: t) -> Path:
    """The staged README (edited) with its manifest beside it, in `folder`."""
    folder.mkdir()
    shutil.copy(ws.repo_dir(quant) / MANIFEST_NAME, folder / MANIFEST_NAME)
    card = folder / "README.md"
    card.write_text(edit(card_text(ws, quant)))
    return card


def test_card_verify_finds_every_edited_line(carded_ladder, tmp_path):
    _, ws, _ = carded_ladder
    proc = run_moeq("card", "verify", str(ws.repo_dir(None) / "README.md"))
    assert proc.returncode == 0 and "no findings" in proc.stdout, proc.stdout + proc.stderr
    text = card_text(ws)
    lines = text.splitlines()
    bullet = next(line for line in lines if line.startswith("- **Source**: "))
    this_row = next(line for line in lines if line.startswith("| [tiny-phimoe-Q4_K_M.gguf]"))
    q2k_row = next(line for line in lines if line.startswith("| [tiny-phimoe-Q2_K.gguf]"))
    q2k_size = re.search(r"\| ([\d.]+ MB) \|", q2k_row).group(1)
    own_size = re.search(r"\| ([\d.]+ MB) \|", this_row).group(1)
    # Another quant's size in this quant's row: a figure the records hold, so lint passes; verify does not.
    swapped_row = this_row.replace(own_size, q2k_size)
    edited_bullet = bullet.replace(bullet.split()[2], "9.36", 1)
    card = _staged_copy(ws, None, tmp_path / "edited",
                        lambda t: t.replace(this_row, swapped_row).replace(bullet, edited_bullet))
    assert run_moeq("card", "lint", str(card)).stdout.count("unrecorded-figure") == 1  # only the bullet
    proc = run_moeq("card", "verify", str(card))
    assert proc.returncode == 7, proc.stdout + proc.stderr
    first, second = proc.stdout.splitlines()
    assert first == (f'{card}:{lines.index(bullet) + 1}: edited: expected {json.dumps(bullet)}, '
                     f'found {json.dumps(edited_bullet)}')
    # A long row is quoted from a little before its first difference, so the edit is in what is shown (it was cut
    # at 100 characters from the start, before the size)
    prefix = f'{card}:{lines.index(this_row) + 1}: edited: expected '
    assert second.startswith(prefix) and len(this_row) > 100
    expected, found = (json.loads(part) for part in second[len(prefix):].split(", found "))
    assert own_size in expected and q2k_size in found and own_size not in found
    assert len(expected) <= 106 and len(found) <= 106 and expected.strip(".") in this_row
    assert found.strip(".") in swapped_row
    assert proc.stderr.strip() == f"error: {card}: 2 finding(s); the lines above name each"
    # A removed and an added line are named too.
    card = _staged_copy(ws, None, tmp_path / "moved", lambda t: t.replace(bullet + "\n", "") + "Hand-added.\n")
    proc = run_moeq("card", "verify", str(card), "--json")
    findings = json.loads(proc.stdout)["findings"]
    assert [(f["line"], f["rule"]) for f in findings] == [(lines.index(bullet) + 1, "removed"), (len(lines), "added")]


def test_card_verify_without_a_manifest_or_with_a_custom_template(carded_ladder, tmp_path):
    _, ws, _ = carded_ladder
    lone = tmp_path / "README.md"
    lone.write_text(card_text(ws))
    proc = run_moeq("card", "verify", str(lone))
    assert proc.returncode == 3 and proc.stderr.startswith(f"error: {tmp_path / MANIFEST_NAME}: no records manifest")
    card = _staged_copy(ws, None, tmp_path / "custom")
    manifest = json.loads((card.parent / MANIFEST_NAME).read_text())
    manifest["card"] = {**manifest["card"], "builtin": False, "template": "ours.md.j2"}
    (card.parent / MANIFEST_NAME).write_text(json.dumps(manifest))
    proc = run_moeq("card", "verify", str(card))
    assert proc.returncode == 3 and "rendered with the pipeline's own template 'ours.md.j2'" in proc.stderr
    proc = run_moeq("card", "verify", str(card), "--template", str(REPO / "templates" / "model-card.md.j2"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
