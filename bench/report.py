"""Docs figures from benchmark JSON: the one way a measured number gets into docs/.

Each doc in ``DOCS`` holds generated blocks between ``<!-- bench-report:NAME ... -->`` and
``<!-- /bench-report:NAME -->``; ``RENDERERS[NAME]`` rebuilds a block from ``bench/results/*.json``, so a
re-run benchmark changes its docs by running this script, never by hand. A result with no JSON (GPU
benchmarks on a CPU-only box) renders as unmeasured. ``tests/test_bench_report.py`` runs ``--check``.

    python bench/report.py           # rewrite the generated blocks
    python bench/report.py --check   # exit 1 and name every block that disagrees with its JSON
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = (
    "README.md",
    "docs/benchmarks.md",
    "docs/training.md",
    "docs/loader.md",
    "docs/evals.md",
    "docs/dalle.md",
    "docs/rlhf.md",
)
BLOCK = re.compile(
    r"(?P<open><!-- bench-report:(?P<name>[\w-]+)[^\n]*?-->\n)"
    r"(?P<body>.*?)"
    r"(?P<close><!-- /bench-report:(?P=name) -->)",
    re.DOTALL,
)
UNMEASURED = "**unmeasured**: needs a GPU session"


def load_results(results_dir: Path) -> dict[str, dict]:
    """Every ``*.json`` in ``results_dir`` by file stem (``loader.json`` -> ``"loader"``)."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(results_dir.glob("*.json"))}


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def loader_rows(report: dict) -> dict[tuple[str, int], dict]:
    return {(row["loader"], row["workers"]): row for row in report["results"]}


def baseline_decodes(report: dict) -> dict[str, str]:
    """Loader name -> webdataset decode spec. Runs before the uint8 baseline only had the float one."""
    return report["settings"].get("baseline_decode", {"webdataset": "torchrgb"})


# -- summary table (docs/benchmarks.md) ---------------------------------------------------------------
def overhead_claim(report: dict) -> list[str]:
    model, engine, plain = report["model"], report["engine_median_ms"], report["plain_median_ms"]
    return [
        f"engine overhead (ZeRO-0 fp32, 1 process, dVAE {model['image_size']} px hidden {model['hidden']}, "
        f"batch {report['batch_size']})",
        f"`{report['command']}`",
        "plain PyTorch loop, same AdamW and batches",
        f"{engine:.1f} ms vs {plain:.1f} ms per step: **{engine / plain:.3f}x**",
        f"<= {report['target_ratio']:.2f}x",
        "`trainer_overhead.json`",
    ]


# How each key of a loader result's "targets" reads in the summary table.
LOADER_TARGETS = {
    "tessera_vs_webdataset": ">= {:g}x",
    "scaling_efficiency_1_to_2": ">= {:g} scaling",
    "tessera_vs_streaming": ">= {:g}x streaming",
    "tessera_cpu_vs_webdataset": "CPU/sample <= 1/{:g} of webdataset's",
    "shuffle_cost": "shuffle <= {:.0%} over shuffle=False",
}


def loader_claim(report: dict) -> list[str]:
    settings, targets = report["settings"], report["targets"]
    rows, decodes = loader_rows(report), baseline_decodes(report)
    parts = []
    for workers in sorted({w for _, w in rows}):
        ours, base = rows.get(("tessera", workers)), rows.get(("webdataset", workers))
        if ours and base:
            parts.append(
                f"{workers} worker{'s' * (workers > 1)}: {ours['samples_per_s']:,.0f} vs "
                f"{base['samples_per_s']:,.0f} samples/s = **{ours['vs_webdataset']:.2f}x**"
            )
    ours = rows.get(("tessera", 1))
    if ours and ours.get("vs_streaming"):
        parts.append(f"**{ours['vs_streaming']:.2f}x** mosaic streaming (1 worker)")
    if ours and ("tessera-ordered", 1) in rows:
        ordered = rows[("tessera-ordered", 1)]["samples_per_s"]
        parts.append(f"shuffle costs {ordered / ours['samples_per_s'] - 1:.0%} (1 worker)")
    if ours and "tessera_cpu_vs_webdataset" in targets:
        base_cpu = rows[("webdataset", 1)]["cpu_us_per_sample"]
        parts.append(
            f"CPU {ours['cpu_us_per_sample']:,.0f} vs {base_cpu:,.0f} us/sample = "
            f"**{ours['cpu_vs_webdataset']:.2f}x** less (1 worker)"
        )
    if ("tessera", 2) in rows:
        parts.append(f"scaling 1->2 workers {rows[('tessera', 2)]['scaling_efficiency']:.2f}")
    if ("webdataset-float", 1) in rows:
        parts.append(
            f"float baseline: {rows[('webdataset-float', 1)]['vs_webdataset']:.2f}x the uint8 one (1 worker)"
        )
    if ("ray-data", 1) in rows:
        ray = rows[("ray-data", 1)]
        parts.append(
            f"Ray Data `read_webdataset` {ray['samples_per_s']:,.0f} samples/s ({ray['vs_webdataset']:.2f}x)"
        )
    return [
        f"loader throughput from {report['store']} ({settings['samples']:,} x {settings['image_size']} px, "
        f"batch {settings['batch_size']}, median of {settings['repeats']})",
        f"`{report['command']}`",
        f'`webdataset.WebDataset(...).decode("{decodes["webdataset"]}")` + DataLoader',
        "; ".join(parts),
        ", ".join(LOADER_TARGETS[name].format(value) for name, value in targets.items()),
        "`loader.json`",
    ]


def sampling_claim(report: dict) -> list[str]:
    model, seconds = report["model"], report["seconds"]
    identical, speedup = report["codes_identical_fraction"], report["speedup_cache_over_no_cache"]
    return [
        f"KV-cache sampling ({report['image_tokens_per_sample']:,} image tokens, "
        f"{model['parameters'] / 1e6:.0f}M-param model, batch {report['batch']}, {report['device']})",
        f"`{report['command']}`",
        "the same model re-running the whole prefix per token",
        f"{seconds['cache']:.1f} s vs {seconds['no-cache']:.1f} s: **{speedup:.1f}x**, "
        + ("identical codes" if identical == 1 else f"{identical:.1%} of codes identical"),
        f">= {report['target_speedup']:g}x",
        "`sampling.json`",
    ]


def attention_claim(report: dict | None) -> list[str]:
    claim = [
        "fused block-sparse attention (DALL-E masks at seq 1280, 62 x 64 heads; long causal)",
        "`python bench/attention.py` (GPU)",
        "SDPA (flash for causal, dense boolean mask for DALL-E masks) and compiled FlexAttention",
    ]
    target = ">= 1.2x Flex, >= 2x masked SDPA, >= 0.9x SDPA-flash causal"
    if report is None:
        return [*claim, UNMEASURED, target, "-"]
    speedups = []
    for baseline in ("flex", "sdpa"):
        values = [
            r["speedup_fwd_bwd"]
            for r in report["results"]
            if r["method"] == baseline and "speedup_fwd_bwd" in r
        ]
        if values:
            speedups.append(f"fwd+bwd vs {baseline} {min(values):.2f}x to {max(values):.2f}x")
    return [*claim, f"{report['device']}: " + "; ".join(speedups), target, "`attention.json`"]


def render_summary(results: dict[str, dict]) -> str:
    rows = [
        overhead_claim(results["trainer_overhead"]),
        loader_claim(results["loader"]),
        sampling_claim(results["sampling"]),
        attention_claim(results.get("attention")),
        ingest_claim(results.get("ingest")),
    ]
    return table(["claim", "command", "baseline", "result", "target", "JSON"], rows)


# -- detail tables ----------------------------------------------------------------------------------
def render_trainer_overhead(results: dict[str, dict]) -> str:
    report = results["trainer_overhead"]
    plain, engine = report["plain_median_ms"], report["engine_median_ms"]
    model, versions = report["model"], report["versions"]
    rows = [
        ["plain PyTorch (forward, backward, clip, AdamW)", f"{plain:.1f}", "1.000"],
        ["tessera Engine (DeepSpeed ZeRO-0)", f"{engine:.1f}", f"{engine / plain:.3f}"],
    ]
    met = "met" if engine / plain <= report["target_ratio"] else "NOT met"
    return (
        f"`{report['command']}` (dVAE {model['image_size']} px, hidden {model['hidden']}, "
        f"{model['vocab_size']} codes, batch {report['batch_size']}, one process, ZeRO-0 fp32, the two loops "
        f"alternating step by step on the same batches; medians of {report['steps_measured']} steps; "
        f"{report['device']}, {report['threads']} thread(s), torch {versions['torch']}, DeepSpeed "
        f"{versions['deepspeed']}, {report['date'][:10]}):\n\n"
        + table(["loop", "median step (ms)", "ratio"], rows)
        + f"\nTarget <= {report['target_ratio']:.2f}x: {met} (`bench/results/trainer_overhead.json`).\n"
    )


def render_loader(results: dict[str, dict], key: str = "loader") -> str:
    """One ``bench/loader.py`` run's table; ``key`` names its JSON (``loader_long``: a longer epoch)."""
    if key not in results:
        return f"**unmeasured**: run `python bench/loader.py` (bench/results/{key}.json)\n"
    report = results[key]
    decodes = baseline_decodes(report)
    names = {
        **{name: f'webdataset `decode("{spec}")`' for name, spec in decodes.items()},
        "tessera": "**tessera**",
        "tessera-ordered": "tessera `shuffle=False`",
        "streaming": "mosaic `StreamingDataset` (MDS, shuffled, cold cache)",
        "ray-data": "Ray Data `read_webdataset`",
    }
    # Columns a run has data for (runs before the streaming peer have no "vs streaming").
    streaming = any(row.get("vs_streaming") for row in report["results"])

    def number(value, spec: str, suffix: str = "") -> str:
        return "-" if value is None else f"{value:{spec}}{suffix}"

    rows = [
        [
            names.get(row["loader"], row["loader"]),
            f"{row['workers']} CPU{'s' * (row['workers'] > 1)}"
            if row["loader"] == "ray-data"
            else str(row["workers"]),
            number(row["samples_per_s"], ",.0f"),
            number(row["vs_webdataset"], ".2f", "x"),
            *([number(row.get("vs_streaming"), ".2f", "x")] if streaming else []),
            number(row["scaling_efficiency"], ".2f"),
            number(row["cpu_us_per_sample"], ".0f"),
            number(row["cpu_vs_webdataset"], ".2f", "x"),
        ]
        for row in report["results"]
    ]
    versions = report["versions"]
    loads = [r["load_average_1min"] for row in report["results"] for r in row["repeats"]]
    note = f" {report['note']}" if report.get("note") else ""
    streaming_version = versions.get("mosaicml-streaming")
    peer = f", mosaicml-streaming {streaming_version}" if streaming_version else ""
    return (
        f"`{report['command']}` on {report['store']}, {report['cores']} cores, {report['date'][:10]} (torch "
        f"{versions['torch']}, webdataset {versions['webdataset']}, Pillow {versions['pillow']}, s3fs "
        f"{versions['s3fs']}, Ray {versions['ray']}{peer}; 1-min load average {min(loads):g}-{max(loads):g})."
        f"{note} "
        f"Ratios are against the `{decodes['webdataset']}` baseline at the same worker count.\n\n"
        + table(
            [
                "loader",
                "workers",
                "samples/s",
                "vs webdataset",
                *(["vs streaming"] if streaming else []),
                "scaling 1->2",
                "CPU us/sample",
                "CPU vs webdataset",
            ],
            rows,
        )
    )


def ingest_claim(report: dict | None) -> list[str]:
    claim = [
        "ingest of a folder of JPEGs into 64 px WebDataset shards (images/s, CPU per image)",
        "`python bench/ingest.py`",
        "img2dataset over the same images served on 127.0.0.1",
    ]
    target = ">= 1.5x img2dataset per core; Ray start-up <= 2 s of a local ingest"
    if report is None:
        return [*claim, "**unmeasured**: run `python bench/ingest.py` on an idle machine", target, "-"]
    full = [row for row in report["results"] if row["images"] == report["settings"]["images"]]
    parts = [
        f"{row['dest']}, {row['workers']} worker{'s' * (row['workers'] > 1)} ({row['mode']}): "
        f"**{row['vs_img2dataset']:.2f}x** images/s, **{row['cpu_vs_img2dataset']:.2f}x** per core"
        for row in full
        if row["tool"] == "tessera" and row["vs_img2dataset"]
    ]
    if report.get("ray_startup_s") is not None:
        parts.append(f"Ray start-up {report['ray_startup_s']:.1f} s ({report['settings']['tiny']} images)")
    return [claim[0], f"`{report['command']}`", claim[2], "; ".join(parts), target, "`ingest.json`"]


def render_ingest(results: dict[str, dict]) -> str:
    report = results.get("ingest")
    if report is None:
        return "**unmeasured**: run `python bench/ingest.py` on an idle machine\n"

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    rows = [
        [
            f"**{row['tool']}**" if row["tool"] == "tessera" else row["tool"],
            row["mode"] or "processes",
            row["dest"],
            str(row["workers"]),
            f"{row['images']:,}",
            f"{row['seconds']:.1f}",
            f"{row['images_per_s']:,.0f}",
            ratio(row["vs_img2dataset"]),
            f"{row['cpu_ms_per_image']:.2f}",
            ratio(row["cpu_vs_img2dataset"]),
        ]
        for row in report["results"]
    ]
    settings, versions = report["settings"], report["versions"]
    loads = [r["load_average_1min"] for row in report["results"] for r in row["repeats"]]
    note = f" {report['note']}" if report.get("note") else ""
    startup = report.get("ray_startup_s")
    return (
        f"`{report['command']}` ({settings['images']:,} {settings['source_size']} px JPEGs to "
        f"{settings['output_size']} px shards; {report['store'] or 'no'} store, {report['cores']} cores, "
        f"{report['date'][:10]}, img2dataset {versions['img2dataset']}, Ray {versions['ray']}; 1-min load "
        f"average {min(loads):g}-{max(loads):g}).{note} Medians of {settings['repeats']} interleaved runs of "
        "the whole command line; ratios against img2dataset at the same workers and destination (CPU: "
        "images per CPU-second, i.e. per core).\n\n"
        + table(
            [
                "tool",
                "mode",
                "dest",
                "workers",
                "images",
                "seconds",
                "images/s",
                "vs img2dataset",
                "CPU ms/image",
                "per core vs img2dataset",
            ],
            rows,
        )
        + (
            f"\nRay start-up in a {settings['tiny']}-image local ingest (Ray minus in-process wall time): "
            f"{startup:.2f} s (target <= 2 s).\n"
            if startup is not None
            else ""
        )
    )


def render_contamination(results: dict[str, dict]) -> str:
    report = results.get("contamination")
    if report is None:
        return "**unmeasured**: run `python bench/contamination.py`\n"
    rows = [
        [
            row["mode"],
            str(row["cpus"]),
            str(row["images"]),
            f"{row['seconds']:.2f}",
            f"{row['images_per_s_per_core']:.0f}",
        ]
        for row in report["rows"]
    ]
    caught = [
        [kind, *(f"{rates[m]:.0%}" for m in ("exact", "phash", "pixels"))]
        for kind, rates in report["planted_caught"].items()
    ]
    false_positive = report["false_positive_rate_disjoint"]
    caught.append(
        [
            "disjoint split (false positives)",
            *(f"{false_positive[m]:.1%}" for m in ("exact", "phash", "pixels")),
        ]
    )
    return (
        f"`{report['command']}` ({report['train_samples']} training and {report['eval_samples']} eval 32 px "
        f"synthetic scenes, no judge features; {report['device']}, "
        f"load average {report['load_average_1m']:.1f}, {report['date'][:10]}; {report['note']}):\n\n"
        + table(["mode", "cpus", "images", "seconds", "images/s/core"], rows)
        + "\nShare of each planted duplicate kind flagged per image method, and of a disjoint split:\n\n"
        + table(["eval samples", "exact", "phash", "pixels"], caught)
    )


# -- reranking (docs/evals.md) --------------------------------------------------------------------------
def render_rerank(results: dict[str, dict]) -> str:
    report = results.get("rerank")
    if report is None:
        return "**unmeasured**: run `python bench/rerank.py` after `make demo`\n"
    rows = []
    for n, result in report["results"].items():
        for group in ("seen", "heldout"):
            entry = result["alignment"].get(group, {}).get("prompt")
            if entry:
                low, high = entry["ci95"]
                score = result["mean_kept_score"][group]
                rows.append(
                    [
                        n,
                        group,
                        f"{entry['accuracy']:.3f}",
                        f"[{low:.3f}, {high:.3f}]",
                        str(entry["total"]),
                        f"{score:.3f}",
                    ]
                )
    sampling = report["sampling"]
    return (
        f"`{report['command']}` ({report['date'][:10]}; DALL-E `{report['dalle']}`, dVAE `{report['dvae']}`, "
        f"judge `{report['judge']}`; {report['captions_per_manifest']} captions per eval manifest, "
        f"temperature {sampling['temperature']}, top-k {sampling['top_k']}, "
        f"guidance {sampling['guidance_scale']}):\n\n"
        + table(["N", "prompts", "whole-prompt alignment", "Wilson 95%", "n", "mean judge score kept"], rows)
    )


# -- demo wall time (README.md) -------------------------------------------------------------------------
def render_demo_time(results: dict[str, dict]) -> str:
    report = results.get("demo_time")
    if report is None:
        return "**unmeasured**: run `python bench/demo_time.py`\n"
    load = report["load_average_1min"]
    verdict = "within" if report["wall_seconds"] <= report["budget_seconds"] else "OVER"
    stages = sorted(report["stage_seconds"].items(), key=lambda item: -item[1])
    listed = ", ".join(f"{name} {seconds} s" for name, seconds in stages)
    return (
        f"`{report['command']}` ({report['date'][:10]}, {report['device']}, torch "
        f"{report['versions']['torch']}, 1-min load average {load['before']:.2f} before / "
        f"{load['after']:.2f} after{'; ' + report['note'] if report['note'] else ''}): the "
        f"{len(stages)} stages from nothing took **{report['wall_seconds']:.0f} s**, {verdict} the "
        f"{report['budget_seconds']} s budget (set-up excluded: {report['excludes']}). Per stage, two at a "
        f"time: {listed}.\n"
    )


# -- RLHF alignment (docs/rlhf.md) ---------------------------------------------------------------------
RLHF_ATTRIBUTES = ("colour", "size", "shape", "count", "prompt")


def render_rlhf_alignment(results: dict[str, dict]) -> str:
    report = results.get("rlhf_alignment")
    if report is None:
        return "**unmeasured**: run `python bench/rlhf_alignment.py`\n"

    def cell(score: dict) -> str:
        low, high = score["ci95"]
        return f"{score.get('accuracy', score.get('mean')):.2f} [{low:.2f}, {high:.2f}]"

    rows = [
        [
            name,
            group,
            *(cell(row["alignment"][group][a]) for a in RLHF_ATTRIBUTES),
            *(
                cell(row["alignment"][group][key]) if key in row["alignment"][group] else "-"
                for key in ("score", "score_gain")
            ),
            str(row["alignment"][group]["prompt"]["total"]),
            f"{row['kl_to_sft']:.2f}",
        ]
        for group in ("seen", "heldout")
        for name, row in report["results"].items()
    ]
    sampling = report["sampling"]
    return (
        f"`{report['command']}` ({report['date'][:10]}; judge `{report['judge']}`; temperature "
        f"{sampling['temperature']}, top-k {sampling['top_k']}, guidance {sampling['guidance_scale']}; "
        f"SFT `{report['results']['sft']['checkpoint']}`). Judge-read accuracy per attribute with Wilson "
        "95% intervals; *prompt* is every attribute of the caption at once; *score* is the mean labeller "
        "score (`alignment_score`) with a normal 95% interval, and its gain over the SFT row on the same "
        "captions and seeds (paired, normal 95% interval):\n\n"
        + table(
            ["policy", "prompts", *RLHF_ATTRIBUTES, "score", "score gain", "n", "KL to SFT (nats/image)"],
            rows,
        )
    )


# -- shuffle quality (docs/loader.md) -------------------------------------------------------------------
def render_shuffle_quality(results: dict[str, dict]) -> str:
    report = results.get("shuffle_quality")
    if report is None:
        return "**unmeasured**: run `python bench/shuffle_quality.py`\n"
    rows = [
        [
            str(row["world_size"]),
            str(row["window_shards"]),
            "yes" if row["shuffle"] else "no (tar order)",
            str(row["shards_per_window_max"]),
            f"{row['mean_distinct_shards_per_batch']:.2f} ({row['mean_distinct_target']:.2f})",
            f"{row['mean_distinct_uniform']:.2f}" if "mean_distinct_uniform" in row else "-",
            f"{row['spearman_rho']:+.3f}",
            f"{row['spearman_rho_vs_streaming']:+.3f}",
        ]
        for row in report["plan"]
    ]
    shards = report["dataset"]["shard_samples"]
    measured = report["loader_measured"]
    return (
        f"`{report['command']}` ({report['date'][:10]}; {report['dataset']['manifest']}: "
        f"{sum(shards):,} samples in {len(shards)} shards of {min(shards)}-{max(shards)}; "
        f"batch {report['batch_size']}; from the plan, no timing):\n\n"
        + table(
            [
                "world size",
                "window (shards)",
                "shuffle",
                "shards per window (max)",
                "distinct shards per batch (target)",
                "uniform draws from the windows",
                "rho vs tar position",
                "rho vs streaming order",
            ],
            rows,
        )
        + f"\nThe real loader (one rank, default window) delivered {measured['samples']:,} samples at "
        f"{measured['mean_distinct_shards_per_batch']:.2f} distinct shards per batch, "
        f"rho {measured['spearman_rho']:+.3f}: the plan's figures. *Uniform draws from the windows* is "
        "the expected distinct shards of a batch drawn uniformly from the same windows' positions (the "
        "hypergeometric ceiling of any shuffle within them): where ranks cut shards, a window holds "
        "small fragments no batch order can spread over every batch, so the target is out of reach "
        "there while the plan sits at that ceiling.\n"
    )


# -- digits preset (docs/dalle.md) ----------------------------------------------------------------------
DIGIT_IMAGES = {
    "real_eval_scans": "real eval scans (the judge's ceiling)",
    "dvae_reconstructions": "dVAE reconstructions of them",
    "dalle_samples": "DALL-E samples for their captions",
}


def render_digits_preset(results: dict[str, dict]) -> str:
    report = results.get("digits_preset")
    if report is None:
        return "**unmeasured**: run `python bench/digits_preset.py`\n"
    rows = []
    for name, label in DIGIT_IMAGES.items():
        share = report["digit_alignment"][name]
        low, high = share["ci95"]
        rows.append([label, f"{share['accuracy']:.3f}", f"[{low:.3f}, {high:.3f}]", str(share["total"])])
    judge = report["judge"]
    stages = [[name, f"{seconds:.0f}"] for name, seconds in report["stage_seconds"].items()]
    return (
        f"`{report['command']}` ({report['date'][:10]}; {report['device']}, 1-minute load average "
        f"{report['load_average_1m']} at the end: other work shared the cores; torch "
        f"{report['versions']['torch']}):\n\n"
        + table(["images", "judge reads the asked digit", "Wilson 95%", "n"], rows)
        + f"\nDALL-E / real scans: **{report['dalle_vs_real']:.3f}**. Judge held-out digit accuracy "
        f"{judge['heldout_accuracy']['digit']:.4f} on {judge['heldout_samples']} scans (bar {judge['bar']}); "
        f"{report['clean_samples']} of {report['eval_samples']} eval scans clean of the models' training "
        f"scans. Wall time per stage (seconds; stages without a dependency between them run two at a "
        f"time), {report['total_seconds']:.0f} s in all:\n\n" + table(["stage", "seconds"], stages)
    )


# -- dVAE quality (docs/dalle.md) -----------------------------------------------------------------------
def render_dvae_quality(results: dict[str, dict]) -> str:
    report = results.get("dvae_quality")
    if report is None:
        return "**unmeasured**: run `python bench/dvae_quality.py` after `make demo`\n"
    attributes = ("colour", "shape", "size", "count", "prompt")
    rows = []
    for name, row in report["rows"].items():
        codes = "-"
        if "vocab_size" in row:
            codes = f"{row['codes_used']:.0%} of {row['vocab_size']}, perplexity {row['perplexity']:.0f}"
        cells = [row["alignment"][key] for key in attributes]
        rows.append(
            [
                name,
                "-" if name == "originals" else f"{row['psnr']:.1f}",
                codes,
                *(f"{cell['accuracy']:.3f}" for cell in cells),
            ]
        )
    prompt = {name: row["alignment"]["prompt"]["ci95"] for name, row in report["rows"].items()}
    intervals = "; ".join(f"{name} [{low:.3f}, {high:.3f}]" for name, (low, high) in prompt.items())
    notes = "; ".join(report["judge_scope_notes"]) or "none"
    return (
        f"`{report['command']}` ({report['date'][:10]}; {report['eval_samples']} scenes of "
        f"`{report['eval_manifest']}`, judge `{report['judge']}`; judge scope: {notes}):\n\n"
        + table(
            [
                "images",
                "PSNR dB",
                "codes in use",
                *attributes,
            ],
            rows,
        )
        + f"\nWhole-prompt Wilson 95% intervals: {intervals}.\n"
    )


def render_schedule(results: dict[str, dict], key: str) -> str:
    """One ``bench/schedule_sweep.py`` run: each variant's judge read-back per eval split."""
    report = results.get(key)
    if report is None:
        stage = key.split("_")[0]
        return f"**unmeasured**: run `python bench/schedule_sweep.py --stage {stage}` after `make demo`\n"
    attributes = ("colour", "shape", "size", "count", "prompt")
    with_psnr = any("psnr" in cell for row in report["variants"].values() for cell in row["splits"].values())
    rows = []
    for name, row in report["variants"].items():
        for split, cell in row["splits"].items():
            scores = cell["alignment"]
            prompt = scores["prompt"]
            rows.append(
                [
                    name,
                    f"{row.get('train_scenes', report['train_scenes']):,}",
                    split,
                    *([f"{cell['psnr']:.1f}", f"{cell['codes_used']:.0%}"] if with_psnr else []),
                    *(f"{scores[a]['accuracy']:.2f}" for a in attributes[:-1]),
                    f"{prompt['accuracy']:.2f} [{prompt['ci95'][0]:.2f}, {prompt['ci95'][1]:.2f}]",
                    f"{scores['score']:.3f}",
                    f"{row['train_seconds']:.0f}",
                ]
            )
    extra = f"; dVAE `{report['dvae']}`" if "dvae" in report else ""
    return (
        f"`{report['command']}` ({report['date'][:10]}; preset `{report['preset']}`, "
        f"{report['eval_samples']} captions per eval set, "
        f"judge `{report['judge']}`{extra}):\n\n"
        + table(
            [
                "variant",
                "training scenes",
                "eval set",
                *(["PSNR dB", "codes in use"] if with_psnr else []),
                *attributes[:-1],
                "prompt [95% CI]",
                "mean score",
                f"train s (1 thread, {report.get('parallel', 1)} variants at once)",
            ],
            rows,
        )
    )


RENDERERS: dict[str, Callable[[dict[str, dict]], str]] = {
    "dvae-schedule": functools.partial(render_schedule, key="dvae_schedule"),
    "dalle-schedule": functools.partial(render_schedule, key="dalle_schedule"),
    "shuffle-quality": render_shuffle_quality,
    "demo-time": render_demo_time,
    "rlhf-alignment": render_rlhf_alignment,
    "summary": render_summary,
    "trainer-overhead": render_trainer_overhead,
    "loader": render_loader,
    "loader-long": functools.partial(render_loader, key="loader_long"),
    "contamination": render_contamination,
    "ingest": render_ingest,
    "rerank": render_rerank,
    "digits-preset": render_digits_preset,
    "dvae-quality": render_dvae_quality,
}


def regenerate(text: str, results: dict[str, dict], doc: str) -> tuple[str, list[str]]:
    """``text`` with every generated block rebuilt, and the names of the blocks whose content changed."""
    changed: list[str] = []

    def rebuild(match: re.Match) -> str:
        name = match["name"]
        if name not in RENDERERS:
            raise ValueError(f"{doc}: unknown generated block {name!r} (known: {', '.join(RENDERERS)})")
        body = RENDERERS[name](results)
        if body != match["body"]:
            changed.append(name)
        return match["open"] + body + match["close"]

    return BLOCK.sub(rebuild, text), changed


def run(root: Path, check: bool) -> list[str]:
    """Rebuild (with ``check``: only compare) the docs under ``root``; ``doc: block`` per difference.

    Raises ValueError when a block is missing from every doc: its figures would then be hand-written.
    """
    results = load_results(root / "bench" / "results")
    texts = {doc: (root / doc).read_text() for doc in DOCS}
    found = {match["name"] for text in texts.values() for match in BLOCK.finditer(text)}
    if missing := [name for name in RENDERERS if name not in found]:
        raise ValueError(f"no generated block {', '.join(missing)} in {', '.join(DOCS)}")
    stale = []
    for doc, text in texts.items():
        path = root / doc
        new_text, changed = regenerate(text, results, doc)
        stale += [f"{doc}: {name}" for name in changed]
        if changed and not check:
            path.write_text(new_text)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if any block is stale")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (docs/ and bench/results/)")
    args = parser.parse_args(argv)
    try:
        stale = run(args.root, args.check)
    except ValueError as error:
        print(f"bench/report.py: {error}", file=sys.stderr)
        return 2
    for entry in stale:
        print(f"{'stale' if args.check else 'rewrote'}: {entry}")
    if args.check and stale:
        print("docs disagree with bench/results/*.json: run `python bench/report.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
