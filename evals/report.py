"""The eval report as one self-contained HTML page (tables + PNG grids inlined) and its MLflow run."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import torch
from PIL import Image

from trainer.tracking import Tracker, image_grid


def _png(images: torch.Tensor, nrow: int = 8) -> str:
    buffer = io.BytesIO()
    grid = Image.fromarray(image_grid(images, nrow=nrow))
    grid.resize((grid.width * 3, grid.height * 3), Image.NEAREST).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def side_by_side(visual: dict[str, Any], count: int = 16) -> torch.Tensor:
    """Eval image, then the image generated for its caption, for the first ``count`` captions."""
    count = min(count, len(visual["generated"]))
    return torch.stack([visual["reference"][:count].float() / 255, visual["generated"][:count]], 1).flatten(
        0, 1
    )


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _alignment_rows(name: str, subset: str, entry: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for group, attributes in entry.get("alignment", {}).items():
        for attribute, value in attributes.items():
            low, high = value["ci95"]
            rows.append(
                [name, subset, group, attribute, value["accuracy"], f"{low:.3f}-{high:.3f}", value["total"]]
            )
    return rows


def metrics_of(report: dict[str, Any]) -> dict[str, float]:
    """Flat MLflow metrics: contamination rates, FID/KID, whole-prompt alignment, memorisation."""
    metrics: dict[str, float] = {}
    for index, (url, section) in enumerate(report["manifests"].items()):
        contamination = report["contamination"][url]
        prefix = f"eval{index}"
        metrics[f"{prefix}.clean_samples"] = contamination["clean_samples"]
        for method, row in contamination["methods"].items():
            metrics[f"{prefix}.contamination.{method}_rate"] = row["rate"]
        for name, scores in [("data", section["data"]), *section["models"].items()]:
            for subset in ("full", "clean"):
                entry = scores[subset]
                for key in ("fid", "kid_mean", "kid_std"):
                    if key in entry:
                        metrics[f"{prefix}.{name}.{subset}.{key}"] = entry[key]
                for group, attributes in entry.get("alignment", {}).items():
                    if "prompt" in attributes:
                        metrics[f"{prefix}.{name}.{subset}.alignment.{group}"] = attributes["prompt"][
                            "accuracy"
                        ]
            for key, value in scores.get("memorisation", {}).items():
                if isinstance(value, float):
                    metrics[f"{prefix}.{name}.memorisation.{key}"] = value
    return metrics


def render_html(report: dict[str, Any], visuals: dict[str, dict[str, Any]], lineage: dict[str, str]) -> str:
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Tessera eval report</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #bbb;padding:2px 8px;text-align:right}img{image-rendering:pixelated}</style>",
        "</head><body><h1>Tessera eval report</h1>",
        _table(["lineage", "value"], [[k, v] for k, v in lineage.items()]),
        "<h2>Judge</h2>",
        _table(
            ["attribute", "held-out accuracy"],
            [[k, v] for k, v in sorted(report["judge"]["heldout_accuracy"].items())],
        ),
    ]
    parts += [f"<p>{html.escape(note)}</p>" for note in report["judge"]["scope_notes"]]
    for url, section in report["manifests"].items():
        contamination = report["contamination"][url]
        parts.append(f"<h2>Eval set {html.escape(url)}</h2><h3>Contamination</h3>")
        parts.append(
            _table(
                ["method", "flagged", "rate"],
                [[m, r["flagged"], r["rate"]] for m, r in contamination["methods"].items()],
            )
        )
        parts.append(
            f"<p>{contamination['eval_samples']} eval samples, {contamination['clean_samples']} clean "
            f"(not flagged by {html.escape(', '.join(contamination['clean_methods']))})</p>"
        )
        metric_rows, alignment_rows = [], []
        for name, scores in [("data", section["data"]), *section["models"].items()]:
            for subset in ("full", "clean"):
                entry = scores[subset]
                metric_rows.append(
                    [
                        name,
                        subset,
                        entry["samples"],
                        *(entry.get(k, "") for k in ("fid", "kid_mean", "kid_std")),
                    ]
                )
                alignment_rows += _alignment_rows(name, subset, entry)
        parts.append("<h3>FID / KID</h3>")
        parts.append(_table(["images", "subset", "samples", "FID", "KID mean", "KID std"], metric_rows))
        parts.append("<h3>Prompt alignment (Wilson 95% intervals)</h3>")
        parts.append(
            _table(["images", "subset", "group", "attribute", "accuracy", "95% CI", "n"], alignment_rows)
        )
        for name, scores in section["models"].items():
            probe = scores["memorisation"]
            parts.append(f"<h3>Memorisation probe: {html.escape(name)}</h3>")
            parts.append(
                _table(["measure", "value"], [[k, v] for k, v in probe.items() if isinstance(v, float)])
            )
    for title, visual in visuals.items():
        parts.append(f"<h2>Images: {html.escape(title)}</h2>")
        parts.append("<p>eval image | generated, for the captions below</p>")
        parts.append(f"<img alt='{html.escape(title)} samples' src='{_png(side_by_side(visual), nrow=8)}'>")
        parts.append(
            "<ol>" + "".join(f"<li>{html.escape(c)}</li>" for c in visual["captions"][:16]) + "</ol>"
        )
        if visual["closest_pairs"] is not None:
            parts.append("<p>closest generated | training pairs (pixel RMS)</p>")
            closest = visual["closest_pairs"].flatten(0, 1)
            parts.append(f"<img alt='{html.escape(title)} closest pairs' src='{_png(closest, nrow=8)}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def log_report(
    tracker: Tracker, report: dict[str, Any], visuals: dict[str, dict[str, Any]], lineage: dict[str, str]
) -> None:
    tracker.set_tags(lineage)
    tracker.log_metrics(metrics_of(report), step=0)
    tracker.log_dict(report, "report.json")
    tracker.log_text(render_html(report, visuals, lineage), "report.html")
    for title, visual in visuals.items():
        tracker.log_image_grid(side_by_side(visual), f"grids/{title.replace('/', '-')}.png", nrow=8)
        if visual["closest_pairs"] is not None:
            tracker.log_image_grid(
                visual["closest_pairs"].flatten(0, 1), f"grids/{title.replace('/', '-')}-closest.png", nrow=8
            )
