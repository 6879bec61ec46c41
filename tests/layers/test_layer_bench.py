"""The per-layer benchmark (`python -m defocus_clip.bench.towers --layer`): runs, reports both modules and the ratio
ViT block / (2 x Mamba layer), and times a kernel built from another source, or ablated builds, in the same process;
`--chain`, the mixer's fused kernels alone; and the paired ratios of the tower benchmarks."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from defocus_clip.bench import measure, towers
from defocus_clip.layers import scan_cpu


def test_layer_bench_reports_times_and_ratio():
    result = towers.bench_layer(batch_size=1, tokens=3, steps=2, warmup=0, threads=1)
    rows = result["rows"]
    assert set(rows) == {"vit", "mamba"}
    for r in rows.values():
        assert 0 < r["best_ms"] <= r["median_ms"]
    expected = rows["vit"]["best_ms"] / (2 * rows["mamba"]["best_ms"])
    assert rows["mamba"]["ratio_best"] == pytest.approx(expected, rel=0.02)
    text = towers.format_layer(result)
    assert "ViT/(2 x layer)" in text and f"{rows['mamba']['ratio_best']:.2f}" in text


@pytest.mark.skipif(not scan_cpu.available(), reason="fused CPU scan kernel not built here (no compiler?)")
def test_layer_bench_compares_another_kernel_source_and_restores_the_shipped_one():
    shipped = scan_cpu._module()
    result = towers.bench_layer(batch_size=1, tokens=3, steps=1, warmup=0, compare_source=str(scan_cpu._SOURCE))
    assert set(result["rows"]) == {"vit", "mamba", "mamba_compare"}
    assert result["rows"]["mamba_compare"]["ratio_median"] > 0
    assert scan_cpu._module() is shipped


def test_layer_cli_prints_the_table(capsys):
    assert towers.main(["--layer", "--batch-size", "1", "--steps", "1", "--warmup", "0", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("one layer: batch 1") and "mamba" in out


def test_speed_ratio_is_paired_per_repeat():
    """Load swings between repeats cancel: the ratio is the median of per-repeat ratios, not a ratio of medians."""
    from defocus_clip.bench.measure import add_ratios

    base = {"img_s": 3.0, "img_s_runs": [4.0, 2.0, 3.0], "peak_step_mb": 100.0}
    model = {"img_s": 1.8, "img_s_runs": [3.6, 1.8, 1.5], "peak_step_mb": 150.0}
    add_ratios([model, base], base)
    assert model["speed_ratio"] == 0.9 and model["speed_ratio_runs"] == [0.9, 0.9, 0.5]
    assert model["memory_ratio"] == 1.5 and base["speed_ratio"] == 1.0
    assert model["speed_ratio_interval"] == [0.5, 0.9, 0.75]  # 3 repeats: [min, max] covers the median 75%


def test_median_interval_is_the_binomial_order_statistics_interval():
    from defocus_clip.bench.measure import median_interval

    assert median_interval([2.0]) == (2.0, 2.0, 0.0)
    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0, 0.75)
    # n = 40: k = 14 is the largest with 1 - 2 P(Bin(40, 1/2) <= 13) >= 0.95 (0.9615; k = 15 gives 0.9193)
    lo, hi, level = median_interval([float(i) for i in range(40)])
    assert (lo, hi) == (13.0, 26.0) and abs(level - 0.96152) < 1e-4
    # many values (exact integer binomials, no float overflow past n = 1023): the normal approximation's k ~ 956
    lo, hi, level = median_interval([float(i) for i in range(2000)])
    assert (lo, hi) == (955.0, 1044.0) and 0.95 <= level < 0.96
    with pytest.raises(ValueError, match="at least one value"):
        median_interval([])


def test_median_interval_covers_the_true_median_of_a_skewed_distribution():
    """The interval assumes nothing about the distribution: on exponential samples (median ln 2) it covers the true
    median at least as often as its level says."""
    import math
    import random

    from defocus_clip.bench.measure import median_interval

    rng = random.Random(0)
    trials, hits = 2000, 0
    for _ in range(trials):
        lo, hi, level = median_interval([rng.expovariate(1.0) for _ in range(15)])
        hits += lo <= math.log(2) <= hi
    assert level >= 0.95 and hits / trials >= level - 0.015


def test_goal_verdict_judges_the_interval_not_the_median_alone():
    assert towers.goal_verdict(0.95, [0.91, 0.97, 0.96], 0.9) == "meets"
    assert towers.goal_verdict(0.91, [0.88, 0.92, 0.96], 0.9) == "at"
    assert towers.goal_verdict(0.89, [0.88, 0.92, 0.96], 0.9) == "at"
    assert towers.goal_verdict(0.85, [0.80, 0.89, 0.96], 0.9) == "below"
    assert towers.goal_verdict(0.91, None, 0.9) == "meets"  # one repeat: the median is all there is


def test_goal_line_reports_the_interval_and_verdict():
    result = {"goal": {"model": towers.GOAL_MODEL, "ratio": 0.9}, "baseline": towers.BASELINE,
              "models": {towers.GOAL_MODEL: {"speed_ratio": 0.908, "speed_ratio_interval": [0.878, 0.915, 0.96]}}}
    (line,) = towers.goal_lines(result)
    assert "ratio: 0.91, 96% interval of the median 0.88-0.92 (at the goal >= 0.9; more paired steps" in line
    result["models"] = {}
    assert towers.goal_lines(result) == []


@pytest.mark.skipif(not scan_cpu.available(), reason="fused CPU scan kernel not built here (no compiler?)")
def test_interleaved_tower_bench_pairs_steps_and_compares_a_kernel(capsys, monkeypatch):
    """All towers in one process: every model gets its steps and paired ratios; the other kernel's run restores the
    shipped kernel and the fused RMSNorm afterwards; glibc is told to keep freed memory first, as the trainer does."""
    from defocus_clip.towers.mamba import RMSNormFp32

    asked = []  # stands in for the process-wide mallopt, which would stay set in this test process
    monkeypatch.setattr(towers, "keep_freed_memory", lambda: asked.append(True) or True)
    shipped, norm = scan_cpu._module(), RMSNormFp32.forward
    result = towers.bench_interleaved(["DeFocus-Mamba-Tiny-8"], batch_size=1, image_size=64, steps=2, warmup=0,
                                      threads=1, compare_source=str(scan_cpu._SOURCE))
    rows = result["models"]
    assert set(rows) == {"clip:ViT-B-32", "clip:DeFocus-Mamba-Tiny-8", f"{towers.GOAL_MODEL} (scan_cpu.cpp)"}
    assert rows["clip:ViT-B-32"]["speed_ratio"] == 1.0
    assert all(len(r["step_times_s"]) == 2 and r["img_s"] > 0 for r in rows.values())
    assert scan_cpu._module() is shipped and RMSNormFp32.forward is norm
    assert asked == [True] and result["kept_freed_memory"] is True
    text = towers.format_interleaved(result)
    assert "vs ViT (paired)" in text and "glibc keeps freed memory (as the trainer)" in text
    lo, hi, level = rows["clip:DeFocus-Mamba-Tiny-8"]["speed_ratio_interval"]
    assert lo <= rows["clip:DeFocus-Mamba-Tiny-8"]["speed_ratio"] <= hi and level == 0.5  # 2 steps: [min, max]


@pytest.fixture
def fake_ablated_builds(monkeypatch):
    """`scan_cpu._build` answering ablated builds with the shipped module (a real one compiles for a minute); records
    the macros asked for."""
    asked = []
    shipped = scan_cpu._module()
    monkeypatch.setattr(scan_cpu, "_build", lambda source=None, defines=(): asked.append(defines) or shipped)
    return asked


@pytest.mark.skipif(not scan_cpu.available(), reason="fused CPU scan kernel not built here (no compiler?)")
def test_ablations_are_timed_as_extra_kernels(fake_ablated_builds):
    """--ablate scan chain: one more row per ablation, each from a build with its DEFOCUS_ABLATE level."""
    result = towers.bench_layer(batch_size=1, tokens=3, steps=1, warmup=0, threads=1, ablate=("scan", "chain"))
    assert set(result["rows"]) == {"vit", "mamba", "mamba (ablated: no scan core)", "mamba (ablated: no chain)"}
    assert fake_ablated_builds == [("DEFOCUS_ABLATE=1",), ("DEFOCUS_ABLATE=2",)]
    assert "mamba (ablated: no chain)" in towers.format_layer(result)
    fake_ablated_builds.clear()
    result = towers.bench_interleaved(["DeFocus-Mamba-Tiny-8"], batch_size=1, image_size=64, steps=1, warmup=0,
                                      threads=1, ablate=("scan",))
    assert f"{towers.GOAL_MODEL} (ablated: no scan core)" in result["models"]
    assert result["ablate"] == ["scan"] and fake_ablated_builds == [("DEFOCUS_ABLATE=1",)]


def test_unknown_ablation_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown ablation 'conv'.*chain.*scan"):
        towers.other_kernels(ablate=("conv",))
    with pytest.raises(SystemExit):
        towers.main(["--layer", "--ablate", "conv"])


def test_time_steps_counts_the_page_faults_of_each_timed_step():
    """A step that faults in fresh memory shows it: the signal that the warm-up left heap growth in the timed steps."""
    import mmap

    import numpy as np

    from defocus_clip.bench.measure import summarise, time_steps

    maps = []

    def grow():  # every step maps and touches 64 MB more: fresh pages, as a heap that still grows
        maps.append(mmap.mmap(-1, 64 * 2**20))
        np.frombuffer(maps[-1], dtype=np.uint8)[::4096] = 1

    try:
        r = time_steps(grow, batch_size=1, steps=2, warmup=0)
    finally:
        for m in maps:
            m.close()
    assert len(r["step_times_s"]) == len(r["page_faults"]) == 2
    assert all(f is None or f > 1000 for f in r["page_faults"])
    quiet = time_steps(lambda: None, batch_size=1, steps=2, warmup=1)
    assert all(f is None or f < 1000 for f in quiet["page_faults"])
    summary = summarise([r, quiet])
    assert summary["page_faults_runs"] == [r["page_faults"], quiet["page_faults"]]
    assert summary["step_times_s_runs"] == [r["step_times_s"], quiet["step_times_s"]]


def test_profile_lists_the_matrix_products_by_shape():
    text = towers.profile_tower("DeFocus-Mamba-Tiny-8", batch_size=2, image_size=64, steps=1, threads=1)
    assert "matrix products by shape" in text
    rows = [line.split() for line in text.split("matrix products by shape")[1].splitlines()[2:] if line.strip()]
    assert rows and all(float(r[0]) >= 0 and float(r[-1]) >= 0 and r[1].startswith("aten::") for r in rows)
    assert any("@" in " ".join(r) for r in rows)


def test_gemm_bench_alternates_towers_and_accounts_their_matrix_products():
    result = towers.bench_gemms(["ViT-B-32", "DeFocus-Mamba-Tiny-8"], batch_size=1, image_size=64, steps=2, warmup=0,
                                threads=1)
    rows = result["models"]
    assert list(rows) == ["clip:ViT-B-32", "clip:DeFocus-Mamba-Tiny-8"]
    for r in rows.values():
        assert 0 < r["gemm_s"] < r["step_s"]
        assert sum(s for s, _ in r["rows"].values()) / 2 == pytest.approx(r["gemm_s"])
        assert all(op.startswith("aten::") and calls % 2 == 0 for (op, *_), (_, calls) in r["rows"].items())
    # ViT-B-32's fc1 forward at 64 px: (1 image x 5 tokens) @ [768, 3072], in all 12 blocks of both steps
    assert rows["clip:ViT-B-32"]["rows"][("aten::addmm", 5, 768, 3072)][1] == 24
    text = towers.format_gemms(result)
    assert "clip:DeFocus-Mamba-Tiny-8: step" in text and text.count("matrix products by shape") == 2


def test_breakdown_splits_each_step_into_module_self_times_and_backward_nodes():
    from defocus_clip.bench.breakdown import bench_breakdown, format_breakdown

    result = bench_breakdown(["ViT-B-32", "DeFocus-Mamba-Tiny-8"], batch_size=1, image_size=64, steps=2, warmup=1,
                             threads=1, keep_memory=False)  # leave this test process's malloc settings alone
    rows = result["models"]
    assert list(rows) == ["clip:ViT-B-32", "clip:DeFocus-Mamba-Tiny-8"]
    for r in rows.values():
        assert r["step_s"] == pytest.approx(r["forward_s"] + r["backward_s"])
        forward = sum(s for s, _ in r["forward"].values())
        backward = sum(s for s, _ in r["backward"].values())
        assert 0 < forward <= r["forward_s"] and 0 < backward <= r["backward_s"]  # self times: nothing twice
    vit, mamba = rows["clip:ViT-B-32"], rows["clip:DeFocus-Mamba-Tiny-8"]
    assert vit["forward"]["Linear 768->3072"][1] == 12  # fc1 of the 12 blocks, per step
    tiny = towers.build_tower("clip:DeFocus-Mamba-Tiny-8", 64)
    depth = sum(type(m).__name__ == "DefocusMambaMixer" for m in tiny.modules())
    assert depth > 1 and mamba["forward"]["DefocusMambaMixer"][1] == depth
    # the gradient a node receives tells the linears apart: ViT's fc2 backward gets (tokens, 768)
    assert any(k.startswith("AddmmBackward0 [") for k in vit["backward"])
    # a parameter's AccumulateGrad node outlives the step: hooked once, it runs once per parameter and step
    n_params = sum(1 for p in tiny.parameters() if p.requires_grad)
    assert mamba["backward"]["torch::autograd::AccumulateGrad"][1] == n_params
    text = format_breakdown(result)
    assert text.count("outside every hook") == 2 and "backward: autograd node" in text
    assert result["kept_freed_memory"] is False and "glibc's default allocator" in text


def test_breakdown_cli_prints_the_tables(capsys):
    towers.main(["--breakdown", "--models", "DeFocus-Mamba-Tiny-8", "--batch-size", "1", "--image-size", "64",
                 "--steps", "1", "--warmup", "0", "--threads", "1", "--default-malloc"])
    out = capsys.readouterr().out
    assert "clip:DeFocus-Mamba-Tiny-8: step" in out and "forward: module self time" in out


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tower_worker_keeps_freed_memory_as_the_trainer_unless_told_not_to(monkeypatch):
    """`make bench`'s towers: each worker process sets glibc as the trainer does and says so; --default-malloc is
    passed on to the workers."""
    row = towers._run_worker("clip:DeFocus-Mamba-Tiny-8", 1, 64, 1, 0, 1)
    assert row["kept_freed_memory"] is True and row["img_s"] > 0
    seen = []
    monkeypatch.setattr(towers, "run_worker", lambda module, args, what: seen.append(args) or row)
    towers._run_worker("clip:ViT-B-32", 1, 64, 1, 0, 1, keep_memory=False)
    towers._run_worker("clip:ViT-B-32", 1, 64, 1, 0, 1)
    assert "--default-malloc" in seen[0] and "--default-malloc" not in seen[1]
    result = {"batch_size": 1, "image_size": 64, "threads": 1, "scan_impl": "cpp", "repeats": 1, "steps": 1,
              "kept_freed_memory": False, "machine": measure.machine_info() | {"loadavg_end": None},
              "baseline": towers.BASELINE, "goal": {"model": towers.GOAL_MODEL, "ratio": towers.GOAL_RATIO},
              "models": {}}
    assert "glibc's default allocator" in towers.format_towers(result).splitlines()[0]


@pytest.mark.skipif(not scan_cpu.available(), reason="fused CPU scan kernel not built here (no compiler?)")
def test_chain_bench_times_each_kernel_op_per_build(fake_ablated_builds):
    """`--chain`: the mixer's fused kernels alone, per op and per kernel build (another source, ablated builds)."""
    result = towers.bench_chain(batch_size=1, tokens=3, calls=2, threads=1, compare_source=str(scan_cpu._SOURCE),
                                ablate=("chain",), keep_memory=False)
    assert fake_ablated_builds == [(), ("DEFOCUS_ABLATE=2",)]  # the other source, then the ablated build
    rows = result["rows"]
    assert set(rows) == {"shipped", "scan_cpu.cpp", "ablated: no chain"}
    for row in rows.values():
        assert all(row[op] > 0 for op in towers.CHAIN_OPS)
        assert row["total"] == pytest.approx(sum(row[op] for op in towers.CHAIN_OPS), abs=0.02)
    assert result["d_inner"] == 1536 and result["kept_freed_memory"] is False and result["cold_caches_mb"] >= 1
    text = towers.format_chain(result)
    assert "chain_bwd ms" in text and "ablated: no chain" in text and "page faults add noise" in text
    assert "caches flushed before each call" in text


@pytest.mark.skipif(not scan_cpu.available(), reason="fused CPU scan kernel not built here (no compiler?)")
def test_chain_cli_prints_the_table(capsys, monkeypatch):
    monkeypatch.setattr(towers, "keep_freed_memory", lambda: False)  # leave this test process's malloc settings alone
    assert towers.main(["--chain", "--batch-size", "1", "--steps", "1", "--threads", "1", "--warm-caches"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fused mixer kernels alone: (Bt, L, D) = (1, 50, 1536)") and "shipped" in out
    assert "warm caches (inputs partly in the last-level cache)" in out


def test_cache_flush_covers_twice_the_last_level_cache():
    """The chain benchmark's flush: sysfs sizes parsed, and a buffer of twice the largest cache (64 MB where sysfs
    says nothing), read and written on each call."""
    assert measure.cache_size_bytes("36608K\n") == 36608 * 1024
    assert measure.cache_size_bytes("2M") == 2 << 20 and measure.cache_size_bytes("512") == 512
    llc = measure.last_level_cache_bytes()
    flush = measure.CacheFlush()
    assert flush.nbytes == 2 * (llc or 32 << 20)
    small = measure.CacheFlush(nbytes=4096)
    small()
    small()
    assert small._buf.shape == (1024,) and bool((small._buf == 2).all())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_applies_on_glibc():
    """Run in a child process: the setting is process-wide."""
    code = "from defocus_clip.train.host import keep_freed_memory; print(keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "True"


@pytest.mark.skipif(not scan_cpu.available(), reason="fused CPU scan kernel not built here (no compiler?)")
def test_scan_core_bench_reports_ticks_per_state_vector_and_token():
    """`--scan-cycles`: forward and backward of the scan core alone per length; a build of a source without the entry
    point is named, not an error."""
    result = towers.bench_scan_core(lengths=(3, 5), tokens_per_run=300, compare_source=str(scan_cpu._SOURCE))
    for name in ("shipped", "scan_cpu.cpp"):
        assert set(result["rows"][name]) == {3, 5}
        assert all(r["fwd"] > 0 and r["bwd"] > 0 for r in result["rows"][name].values())
    text = towers.format_scan_core(result)
    assert "backward (recompute + reverse)" in text and result["unit"] in text
    result["rows"]["old.cpp"] = {}
    assert "no scan_core_ticks in this build" in towers.format_scan_core(result)


@pytest.mark.skipif(not scan_cpu.available(), reason="fused CPU scan kernel not built here (no compiler?)")
def test_scan_core_ticks_checks_its_arguments():
    with pytest.raises(RuntimeError, match="pass 0 or 1"):
        scan_cpu._module().scan_core_ticks(2, 8, 1)


def test_missing_compare_source_is_a_clear_cli_error(capsys, tmp_path):
    missing = tmp_path / "old_kernel.cpp"
    with pytest.raises(SystemExit) as e:
        towers.main(["--chain", "--compare-source", str(missing)])
    assert e.value.code == 2
    assert f"--compare-source {missing}: no such C++ source file" in capsys.readouterr().err


def test_drop_path_bench_pairs_the_skipped_and_masked_forms(capsys):
    """`--drop-path`: one tower at rate 0 and at the rate in both forms, steps paired; the module switch restored."""
    from defocus_clip.layers import drop_path as drop_path_mod

    result = towers.bench_drop_path(0.5, "timm:defocus_mamba_tiny_patch8_64", batch_size=4, image_size=64, steps=2,
                                    warmup=0, threads=1)
    assert list(result["models"]) == ["rate 0", "rate 0.5, masked (timm)", "rate 0.5, dropped samples skipped"]
    assert all(len(r["step_times_s"]) == 2 and r["img_s"] > 0 for r in result["models"].values())
    assert result["skip_speedup"] > 0 and result["kept_fraction"] == pytest.approx(0.75)
    assert drop_path_mod.SKIP_DROPPED is True
    assert "x the speed of the masked form" in towers.format_drop_path(result)
    assert towers.main(["--drop-path", "0.2", "--models", "defocus_mamba_tiny_patch8_64", "--image-size", "64",
                        "--batch-size", "2", "--steps", "1", "--warmup", "0", "--threads", "1"]) == 0
    assert "training at drop path 0.2" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [(["--drop-path", "1.0"], "must be in (0, 1)"),
                                           (["--drop-path", "0.3", "--models", "a", "b"], "one tower"),
                                           (["--drop-path", "0.3", "--device", "cuda"], "measures on the CPU")])
def test_drop_path_bench_cli_errors(args, message, capsys):
    with pytest.raises(SystemExit):
        towers.main(args)
    assert message in capsys.readouterr().err


def test_drop_path_bench_needs_a_tower_with_a_drop_path_schedule():
    from defocus_clip.errors import ConfigError

    with pytest.raises(ConfigError, match="clip:ViT-B-32 has no set_drop_path_rate"):
        towers.bench_drop_path(0.3, "ViT-B-32", batch_size=1, image_size=32, steps=1, warmup=0)
