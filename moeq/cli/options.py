"""The options several commands share, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from moeq.cli.app import note_json

ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="Path to pipeline.yaml (default: "
                                                     "$MOEQ_CONFIG, else ./pipeline.yaml).")]
JsonOption = Annotated[bool, typer.Option("--json", callback=note_json, help="Print the result as JSON on stdout.")]
SwitchLayoutOption = Annotated[bool, typer.Option("--switch-layout", help="Publish in the pipeline's hub.layout "
                                                 "although this workspace or the Hub repo used the other one.")]
QuantsOption = Annotated[Optional[list[str]], typer.Option("--quant", "-q", help="Quant type(s) of the ladder "
                                                           "(default: all).")]
