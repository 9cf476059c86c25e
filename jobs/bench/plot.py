"""The bench's PNG: items/s of each way of embedding relative to the reference baseline, then the sweep."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def plot(result: dict, path: Path) -> Path:
    """A PNG: per modality, items/s of each way of embedding relative to the reference baseline; then the sweep."""
    bars = [
        ("pipeline fp32", (31, 119, 180)),
        ("pipeline bf16", (255, 127, 14)),
        ("bare fp32", (44, 160, 44)),
        ("bare bf16", (214, 39, 40)),
    ]
    m = result["modalities"]
    sweep = [p for p in result.get("sweep") or [] if "items_per_s" in p]
    width, panel = 900, 320
    canvas = Image.new("RGB", (width, panel * (1 + bool(sweep)) + 60), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=14)
    draw.text((10, 8), "items/s relative to the reference baseline (= 1, dashed)", fill="black", font=font)
    values = {
        mod: [
            r["pipeline"]["float32"]["items_per_s"],
            r["pipeline"]["bfloat16"]["items_per_s"],
            r["bare"]["float32"]["items_per_s"],
            r["bare"]["bfloat16"]["items_per_s"],
        ]
        for mod, r in m.items()
    }
    rel = {mod: [v / m[mod]["baseline"]["items_per_s"] for v in vs] for mod, vs in values.items()}
    top = max([1.0, *(v for vs in rel.values() for v in vs)]) * 1.1
    x0, y0, y1 = 60, 40, panel
    scale = (y1 - y0 - 30) / top
    draw.line((x0, y1, width - 20, y1), fill="black")
    group = (width - x0 - 40) / max(len(rel), 1)
    for g, (mod, vs) in enumerate(rel.items()):
        gx = x0 + g * group + 20
        for b, v in enumerate(vs):
            bx = gx + b * (group - 40) / len(vs)
            draw.rectangle((bx, y1 - v * scale, bx + (group - 40) / len(vs) - 6, y1), fill=bars[b][1])
            draw.text((bx, y1 - v * scale - 16), f"{v:.2f}", fill="black", font=font)
        draw.text((gx, y1 + 4), mod, fill="black", font=font)
    for x in range(x0, width - 20, 12):
        draw.line((x, y1 - scale, x + 6, y1 - scale), fill="gray")
    for b, (name, colour) in enumerate(bars):
        draw.rectangle((width - 170, 30 + 18 * b, width - 158, 42 + 18 * b), fill=colour)
        draw.text((width - 152, 28 + 18 * b), name, fill="black", font=font)
    if sweep:
        y0, y1 = panel + 70, 2 * panel + 30
        draw.text((10, y0 - 20), "image pipeline fp32 items/s by actors x batch x threads", fill="black", font=font)
        top = max(p["items_per_s"] for p in sweep) * 1.15
        scale = (y1 - y0 - 20) / top
        step = (width - x0 - 40) / len(sweep)
        draw.line((x0, y1, width - 20, y1), fill="black")
        for i, p in enumerate(sweep):
            bx = x0 + i * step + 10
            draw.rectangle((bx, y1 - p["items_per_s"] * scale, bx + step - 30, y1), fill=bars[0][1])
            draw.text((bx, y1 - p["items_per_s"] * scale - 16), f"{p['items_per_s']:.1f}", fill="black", font=font)
            draw.text((bx, y1 + 4), f"{p['actors']}a b{p['batch']} t{p['threads'] or 'auto'}", fill="black", font=font)
    canvas.save(path)
    return path
