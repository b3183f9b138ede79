"""The benchmark scripts' own logic: the serving mix, the concurrency list, the figures of a level, their answers
to bad flags, and the source fingerprint the GPU scripts print (CPU only, no server)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load("bench_serving")


def test_nine_consecutive_requests_cover_every_prompt_size_and_output_length_pair():
    for first in range(20):
        pairs = {bench.planned_request(k, cap=512)[0::2] for k in range(first, first + 9)}
        assert pairs == {(size, out) for size in ("short", "medium", "long") for out in (128, 256, 512)}


def test_each_group_of_three_requests_has_all_prompt_sizes_and_all_output_lengths():
    for first in range(0, 30, 3):
        plans = [bench.planned_request(k, cap=512) for k in range(first, first + 3)]
        assert {p[0] for p in plans} == {"short", "medium", "long"}
        assert sorted(p[2] for p in plans) == [128, 256, 512]


def test_prompts_are_deterministic_distinct_and_grow_with_their_size():
    assert bench.planned_request(5, 512) == bench.planned_request(5, 512)
    prompts = [bench.planned_request(k, 512, level)[1] for level in range(3) for k in range(300)]
    assert len(set(prompts)) == 900  # each starts with its level and number: no prefix shared between requests
    assert all(p.startswith(f"Level 1, request {k}. ") for k, p in enumerate(prompts[300:600]))
    short, medium, long = (len(bench.planned_request(k, 512)[1]) for k in (0, 1, 2))
    assert short < medium < long
    assert long > 15 * len(bench.PARAGRAPH)


def test_max_tokens_caps_the_output_lengths():
    assert {bench.planned_request(k, cap=16)[2] for k in range(9)} == {16}
    assert {bench.planned_request(k, cap=200)[2] for k in range(9)} == {128, 200}


def test_concurrency_list_is_parsed_and_bad_lists_are_refused_with_an_example():
    assert bench.parse_levels("1,8,32,64,128") == [1, 8, 32, 64, 128]
    assert bench.parse_levels(" 4 ") == [4]
    for bad in ("", "1,x", "0,8", "-1"):
        with pytest.raises(ValueError, match="like 1,8,32"):
            bench.parse_levels(bad)


def test_server_cpus_are_parsed_as_lists_and_ranges():
    assert bench.parse_cpus("0,1") == {0, 1}
    assert bench.parse_cpus("0-3, 8") == {0, 1, 2, 3, 8}
    for bad in ("", "a", "1,,2", "-1", "3-x"):
        with pytest.raises(ValueError, match="like 0,1 or 0-3"):
            bench.parse_cpus(bad)


def test_a_level_counts_errors_and_measures_tokens_over_its_whole_wall_time():
    ok = bench.Result(sent=10.0, done=12.0, ttft=0.5, gaps=[0.01, 0.02], prompt_tokens=100, completion_tokens=100,
                      engine_ttft=0.05, client=0)
    late = bench.Result(sent=11.0, done=14.0, ttft=1.5, gaps=[0.03], prompt_tokens=300, completion_tokens=300,
                        engine_ttft=0.07, client=1)
    failed = bench.Result(sent=12.5, done=12.6, error="HTTP 400: too long", client=0)
    f = bench.summarize([ok, late, failed], clients=2, cap=512)
    assert (f["clients"], f["requests"], f["errors"], f["first_error"]) == (2, 3, 1, "HTTP 400: too long")
    assert f["wall_s"] == pytest.approx(4.0)  # first sent (10.0) to last done (14.0)
    assert f["completion_tokens"] == 400 and f["output_tok_per_s"] == pytest.approx(100.0)
    assert f["prompt_tokens_mean"] == 200
    assert f["ttft_p50_ms"] == pytest.approx(500.0) and f["ttft_p99_ms"] == pytest.approx(1500.0)
    assert f["itl_p99_ms"] == pytest.approx(30.0)
    assert "| 2 | 3 | 1 | 200 | 400 | 4.0 | 100.0 |" in bench.row(f)
    # the level lasts as long as its slowest client: client 1's 300 tokens over 3 s (client 0: 2.6 s)
    assert (f["slowest_client_tokens"], f["slowest_client_s"]) == (300, pytest.approx(3.0))
    assert bench.row(f).endswith("| 300 in 3.0 |\n")


def test_a_level_where_every_request_failed_still_gives_figures_and_strict_json():
    f = bench.summarize([bench.Result(sent=1.0, done=1.2, error="ConnectError: refused")], clients=1, cap=128)
    assert f["errors"] == 1 and f["completion_tokens"] == 0 and math.isnan(f["ttft_p50_ms"])
    text = json.dumps(bench.json_safe(f), allow_nan=False)
    assert json.loads(text)["ttft_p50_ms"] is None


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / script), *args], check=False, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--concurrency", "1,eight"], "--concurrency takes whole numbers"),
        (["--concurrency", "1,8", "--clients", "4"], "not both"),
        (["--checkpoint", "/nonexistent/ck20"], "is not a folder"),
        (["--url", "http://127.0.0.1:9", "--checkpoint", "/tmp"], "leave out --url"),
        (["--server-cpus", "0,x"], "--server-cpus takes CPU numbers like 0,1"),
        (["--server-cpus", "100000"], "not among the CPUs this process may use"),
        (["--temperature", "1", "--top-p", "0"], "--top-p must be in (0, 1]"),
    ],
)
def test_bench_serving_refuses_bad_flags_in_one_line(args, says):
    done = _run("bench_serving.py", *args)
    assert done.returncode != 0
    assert says in done.stderr and "Traceback" not in done.stderr


def test_bench_multiturn_refuses_a_missing_checkpoint_in_one_line():
    done = _run("bench_multiturn.py", "--checkpoint", "/nonexistent/ck20", "--device", "cuda:0")
    assert done.returncode != 0
    assert "is not a folder" in done.stderr and "Traceback" not in done.stderr


def test_bench_host_step_times_each_part_of_a_decode_step_per_batch():
    done = _run("bench_host_step.py", "--sequences", "1,3", "--length", "40", "--steps", "5")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(" sequences")[0].strip() for line in lines] == ["1", "3"]
    assert all("prepare" in line and "build" in line and "advance" in line for line in lines)
    bad = _run("bench_host_step.py", "--sequences", "0")
    assert bad.returncode != 0 and "at least 1" in bad.stderr and "Traceback" not in bad.stderr


def test_sass_per_code_compiles_the_moe_gemv_for_sm90_without_a_gpu_and_counts_its_loop():
    out = subprocess.run([sys.executable, str(SCRIPTS / "sass_per_code.py"), "gemv-mlp1"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    per_code = float(out.stdout.split("instructions a code")[0].rsplit(":", 1)[1])
    assert 2 < per_code < 10  # 4.97 at 0a2b985: decode, FFMA and loads of each 4-bit code
    assert "FFMA" in out.stdout  # the opcode tally of the loop


def test_sass_per_code_shows_the_gluon_moe_decoding_into_the_wgmma_operand_without_shared_memory():
    # moe_wgmma's point: the decoded codes are the wgmma register operand as they come out (no STS, no layout
    # change through shared memory), at about 4.3 instructions a code (the Triton W_FIRST tiles take ~8).
    out = subprocess.run([sys.executable, str(SCRIPTS / "sass_per_code.py"), "wgmma-mlp2"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    per_code = float(out.stdout.split("instructions a code")[0].rsplit(":", 1)[1])
    assert 2 < per_code < 6
    assert "HGMMA" in out.stdout and "stores (STS) in the loop: 0" in out.stdout


def test_every_grouped_sweep_entry_runs_the_path_it_names_whichever_table_moe_picks():
    # moe_grouped merges a config over the table it picks by size: an entry must not inherit that table's
    # DOT_SCALED / FAST_FP4 / ONE_DOT / W_FIRST / MLP2 (the W_FIRST sweep's 512-token rows once ran dot_scaled).
    from kubrick.engine.kernels._common import _TABLE

    kernels = _load("bench_kernels")
    entries = (kernels.GROUPED_SWEEP + kernels.SMALL_SWEEP + kernels.SMALL_MLP2 + kernels.SMALL_MLP1 + kernels.MID_SWEEP
               + kernels.ONE_DOT_SWEEP + kernels.PREFILL_FAST + kernels.W_FIRST_SWEEP)
    for family in _TABLE.values():
        for table in (family["moe_grouped"], family["moe_grouped_small"]):
            for entry in entries:
                merged = table | kernels.explicit(entry)
                for flag in ("DOT_SCALED", "FAST_FP4", "ONE_DOT", "W_FIRST"):
                    assert merged[flag] == entry.get(flag, False), (entry, flag)
                assert merged["MLP2"] == entry.get("MLP2", {})
                assert merged["WGMMA"] is False  # never handed to sm90's Gluon kernels


def test_the_engine_profile_names_every_moe_kernel_it_runs():
    # A kernel the profile cannot name lands in "other torch kernels" and hides where a step's time goes (run 37's
    # first profile did that with the Gluon MoE).
    engine = _load("bench_engine")
    for name in ("_mlp1_wgmma_kernel", "_mlp2_wgmma_kernel", "_mlp1_swiglu_grouped_kernel", "_group_by_expert_kernel"):
        assert "MoE" in engine.kernel_label(name), name


def test_the_decode_timeline_charges_each_kernel_what_it_adds_to_the_step():
    # Under PDL kernels overlap: b starts inside a and ends 3 us after it; c lies wholly inside b (adds nothing);
    # d starts 1 us after everything before it ended (1 us idle) and runs 2 us.
    kernel_increments = _load("bench_decode").kernel_increments
    events = [("a", 0.0, 5.0), ("b", 4.0, 4.0), ("c", 5.0, 1.0), ("d", 9.0, 2.0)]
    increments, durations, idle = kernel_increments(events)
    assert increments == {"b": 3.0, "c": 0.0, "d": 3.0} and idle == 1.0
    assert durations == {"a": 5.0, "b": 4.0, "c": 1.0, "d": 2.0}
    assert sum(increments.values()) == 11.0 - 5.0  # the stretch after the first kernel's end


def test_source_fingerprint_follows_the_code_and_ignores_python_caches(tmp_path):
    # A copy of the script in a small tree of its own (it hashes the tree it sits in).
    for folder in ("kubrick", "scripts", "triton"):
        (tmp_path / folder).mkdir()
    (tmp_path / "scripts" / "source_fingerprint").write_bytes((SCRIPTS / "source_fingerprint").read_bytes())
    (tmp_path / "kubrick" / "engine.py").write_text("step = 1\n")
    (tmp_path / "triton" / "config.pbtxt").write_text('name: "llm"\n')

    def fingerprint() -> str:
        out = subprocess.run(["bash", str(tmp_path / "scripts" / "source_fingerprint")], capture_output=True,
                             text=True, check=True).stdout.strip()
        assert len(out) == 12 and all(c in "0123456789abcdef" for c in out)
        return out

    first = fingerprint()
    (tmp_path / "kubrick" / "__pycache__").mkdir()
    (tmp_path / "kubrick" / "__pycache__" / "engine.cpython-311.pyc").write_bytes(b"\x00cache")
    assert fingerprint() == first  # caches are not the code
    (tmp_path / "kubrick" / "engine.py").write_text("step = 2\n")
    assert fingerprint() != first
    (tmp_path / "kubrick" / "engine.py").write_text("step = 1\n")
    assert fingerprint() == first


def test_bench_render_times_each_prompt_size_and_the_share_a_thread_keeps():
    pytest.importorskip("openai_harmony")
    done = _run("bench_render.py")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(" prompt")[0].strip() for line in lines[:3]] == ["short", "medium", "long"]
    tokens = [int(line.split(":")[1].split("tokens")[0]) for line in lines[:3]]
    assert tokens[0] < tokens[1] < tokens[2]  # the mix's three sizes, rendered
    share = float(lines[3].split("keeps ")[1].split(" of")[0])
    assert 0 < share <= 1.5
