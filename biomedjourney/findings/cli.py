"""`python -m biomedjourney findings`: text -> structured findings as JSON.

    python -m biomedjourney findings --text "New small right pleural effusion."
    python -m biomedjourney findings --jsonl reports.jsonl --out findings.jsonl   # lines {"id", "text"}
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, TextIO


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the `findings` subcommand on an argparse subparsers object."""
    p = sub.add_parser("findings", help="text -> structured findings (JSON)",
                       description="Read findings (name, side, zone, severity, change) from a description or a "
                                   "report. --text prints {findings, text}; --jsonl reads lines {id, text} and "
                                   "writes one {id, findings} line each.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help='a description or report, e.g. "New right pleural effusion."')
    src.add_argument("--jsonl", type=Path, help="input file, one JSON object {id, text} per line")
    p.add_argument("--out", type=Path, help="with --jsonl: output file (default: stdout)")
    p.add_argument("--backend", choices=["rules", "openai", "auto"], default="rules",
                   help="rules (offline, default), openai (GPT-4 structured outputs) or auto")
    return p


def _dump(findings) -> list[dict]:
    return [f.model_dump() for f in findings]


def _jsonl(path: Path, out: TextIO, extract: Callable) -> None:
    """Read {id, text} lines, write {id, findings} lines; ValueError names the bad line."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
                raise ValueError(f"{path}:{n}: expected an object with a non-empty 'text'")
            out.write(json.dumps({"id": row.get("id"), "findings": _dump(extract(row["text"]))}) + "\n")


def run(a) -> int:
    """Run the subcommand; errors are one line on stderr and exit status 2."""
    from . import FindingsError, extract_findings_any, render
    extract = lambda t: extract_findings_any(t, backend=a.backend)  # noqa: E731
    try:
        if a.text is not None:
            findings = extract(a.text)
            print(json.dumps({"findings": _dump(findings), "text": render(findings)}))
            return 0
        if a.out is None:
            _jsonl(a.jsonl, sys.stdout, extract)
        else:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            with open(a.out, "w", encoding="utf-8") as out:
                _jsonl(a.jsonl, out, extract)
        return 0
    except FileNotFoundError as e:
        print(f"error: no such file: {e.filename}", file=sys.stderr)
    except (ValueError, FindingsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
    return 2
