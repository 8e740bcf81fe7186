"""The closing table of bench/gpu.sh: each step's outcome, the tests, and the engine and serving figures.

    python bench/gpu_summary.py OUT_DIR TAG [STEP=RC:SECONDS ...]

Reads what gpu.sh wrote to OUT_DIR (gpu-TAG-tests.xml, engine-TAG.json, serving-TAG.json), prints
Markdown and writes it to OUT_DIR/gpu-TAG-summary.md. A file that a failed step did not write is
reported as missing; the table is made of whatever is there.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data


def _mib(memory: dict[str, Any] | None, key: str) -> str:
    value = (memory or {}).get(key)
    return "-" if value is None else f"{value:,.0f}"


def steps_table(steps: list[str]) -> list[str]:
    lines = ["| step | exit | seconds |", "|---|---|---|"]
    for item in steps:
        name, _, rest = item.partition("=")
        rc, _, seconds = rest.partition(":")
        verdict = {"0": "ok", "124": "timed out", "137": "killed at its limit"}.get(rc, f"failed ({rc})")
        lines.append(f"| {name} | {verdict} | {seconds} |")
    return lines


def tests_line(xml: Path) -> str:
    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError):
        return f"tests: no report ({xml.name} missing)"
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return "tests: empty report"
    counts = {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    line = (
        f"tests: {passed} passed, {counts['failures']} failed, {counts['errors']} errors, "
        f"{counts['skipped']} skipped ({suite.get('time', '?')} s)"
    )
    return line + "".join(f"\n- failed: `{name}`" for name in failed)


def engine_tables(result: dict[str, Any]) -> list[str]:
    state = result.get("state_nbytes")
    lines = [
        f"engine: {result['model']}, {result['strategy']}, {result['backend']}; live state per sequence "
        + (f"{state / 2**20:.1f} MiB" if state else "?")
        + f"; snapshot cache budget {result.get('state_cache_mb', 0)} MiB",
        "",
        "| streams | decode tok/s | per stream | steady tok/s | TTFT p50 ms | TTFT p95 ms "
        "| CUDA peak MiB | CUDA reserved MiB | snapshot cache MiB (entries) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["decode"]:
        memory = row.get("memory")
        cache = f"{_mib(memory, 'state_cache_mib')} ({(memory or {}).get('state_cache_entries', '-')})"
        lines.append(
            f"| {row['concurrency']} | {row['decode_tok_s']:.1f} | {row['per_stream_tok_s']:.1f} "
            f"| {row['steady_decode_tok_s']:.1f} | {row['ttft_p50_ms']:.0f} | {row['ttft_p95_ms']:.0f} "
            f"| {_mib(memory, 'cuda_peak_allocated_mib')} | {_mib(memory, 'cuda_reserved_mib')} | {cache} |"
        )
    lines += ["", "| prompts | tokens each | prefill tok/s | CUDA peak MiB |", "|---|---|---|---|"]
    for row in result["prefill"]:
        lines.append(
            f"| {row['concurrency']} | {row['prompt_tokens']} | {row['prefill_tok_s']:.0f} "
            f"| {_mib(row.get('memory'), 'cuda_peak_allocated_mib')} |"
        )
    return lines


def serving_table(result: dict[str, Any]) -> list[str]:
    lines = [
        f"serving: {result['model']}, {result['strategy']}, replies of {result['reply_tokens']} tokens; "
        f"rwkv package, one sequence: {result['package_single_tok_s']:.1f} tok/s",
        "",
        "| dialect | users | tok/s | forward tok/s | efficiency | TTFT p50 ms | TTFT p95 ms | per user tok/s "
        "| errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["levels"]:
        lines.append(
            f"| {row['dialect']} | {row['users']} | {row['tok_s']:.1f} | {row['forward_tok_s']:.1f} "
            f"| {row['efficiency']:.2f} | {row['ttft_p50_ms']:.0f} | {row['ttft_p95_ms']:.0f} "
            f"| {row['per_user_tok_s']:.1f} | {row['errors']} |"
        )
    return lines


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    out, tag, steps = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    lines = [f"# bench/gpu.sh, {tag}", "", *steps_table(steps), "", tests_line(out / f"gpu-{tag}-tests.xml")]
    for name, table in (("engine", engine_tables), ("serving", serving_table)):
        path = out / f"{name}-{tag}.json"
        result = _load(path)
        lines += ["", *(table(result) if result else [f"{name}: no result ({path.name} missing)"])]
    text = "\n".join(lines) + "\n"
    (out / f"gpu-{tag}-summary.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
