"""scripts/bench_engine.py keeps working: it writes its figures as JSON and prints the table (no timing
assertions; the figures themselves live in the benchmarks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_engine.py"


def test_bench_engine_reports_tiny_on_cpu(tmp_path):
    out = tmp_path / "result.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--prompt-tokens", "40", "--decode-tokens", "3", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert result["preset"] == "tiny" and result["device"] == "cpu"
    assert result["prompt_tokens"] == 40 and result["decode_tokens"] == 3
    assert result["prefill_tok_s"] > 0 and result["decode_tok_s"] > 0
    # embedding + unembedding (2 x 201088 x 64 bf16) dominate; experts stay packed
    assert 51e6 < result["weights_bytes"] < 53e6
    assert "decode 3 tokens" in run.stdout and "weights in memory" in run.stdout
