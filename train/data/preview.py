"""Contact sheets: one row per category, one column per defect type, boxes drawn, a full-resolution zoom below;
for the grading tasks one row per attribute, its photos by level, limit samples framed."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

CELL, ZOOM_H, CAPTION = 224, 112, 14
RED = (255, 40, 40)


def _zoom(image: Image.Image, box) -> Image.Image:
    """The first defect at native resolution (a 2:1 window around it), so tiny defects are visible."""
    x0, y0, x1, y1 = box
    w = min(image.width, 2 * (image.height // 2), max(64, int(1.6 * max(x1 - x0, 2 * (y1 - y0)))))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = int(min(max(cx - w / 2, 0), image.width - w)), int(min(max(cy - w / 4, 0), image.height - w / 2))
    crop = image.crop((left, top, left + w, top + w // 2)).copy()
    ImageDraw.Draw(crop).rectangle(
        [x0 - left, y0 - top, x1 - left - 1, y1 - top - 1], outline=RED, width=max(1, w // 128)
    )
    return crop.resize((CELL, ZOOM_H), Image.NEAREST)


def contact_sheet(items, path: str | Path) -> Path:
    """Write a PNG showing a good and each defect type of every category of an items split."""
    meta = items.select_columns(["category", "defect_type"]).to_dict()
    categories = list(dict.fromkeys(meta["category"]))
    kinds = ["good"] + sorted({d for d in meta["defect_type"] if d})
    first = {}
    for row, (cat, kind) in enumerate(zip(meta["category"], meta["defect_type"], strict=True)):
        first.setdefault((cat, kind or "good"), row)
    cell_h = CAPTION + CELL + ZOOM_H
    sheet = Image.new("RGB", (CELL * len(kinds), CAPTION + cell_h * len(categories)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, kind in enumerate(kinds):
        draw.text((c * CELL + 4, 1), kind, fill="black")
    for r, cat in enumerate(categories):
        top = CAPTION + r * cell_h
        draw.text((4, top + 1), cat, fill="black")
        for c, kind in enumerate(kinds):
            if (cat, kind) not in first:
                continue
            item = items[first[(cat, kind)]]
            image = item["image"].convert("RGB")
            thumb = image.resize((CELL, CELL), Image.BILINEAR)
            scale = CELL / image.width
            for x0, y0, x1, y1 in item["boxes"]:
                ImageDraw.Draw(thumb).rectangle([x0 * scale, y0 * scale, x1 * scale, y1 * scale], outline=RED, width=2)
            sheet.paste(thumb, (c * CELL, top + CAPTION))
            if item["boxes"]:
                sheet.paste(_zoom(image, item["boxes"][0]), (c * CELL, top + CAPTION + CELL))
    sheet.save(path)
    return Path(path)


def grading_sheet(items, path: str | Path, columns: int = 10) -> Path:
    """Write a PNG of a grading split's first category: one row per attribute, `columns` of its photos by rising
    level (limit samples framed red), the level under each."""
    meta = items.select_columns(["category", "attribute", "level", "limit"]).to_dict()
    category, side = meta["category"][0], CELL // 2
    keys = list(zip(meta["category"], meta["attribute"], strict=True))
    attributes = list(dict.fromkeys(a for c, a in keys if c == category))
    sheet = Image.new("RGB", (side * columns + 90, (side + CAPTION) * len(attributes)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, attribute in enumerate(attributes):
        rows = sorted((i for i, k in enumerate(keys) if k == (category, attribute)), key=lambda i: meta["level"][i])
        top = r * (side + CAPTION)
        draw.text((side * columns + 4, top + side // 2), f"{category}\n{attribute}", fill="black")
        for c, i in enumerate(dict.fromkeys(rows[round(j * (len(rows) - 1) / (columns - 1))] for j in range(columns))):
            sheet.paste(items[i]["image"].convert("RGB").resize((side, side), Image.BILINEAR), (c * side, top))
            if meta["limit"][i]:
                draw.rectangle([c * side, top, (c + 1) * side - 1, top + side - 1], outline=RED, width=3)
            draw.text((c * side + 4, top + side), f"{meta['level'][i]:.2f}", fill="black")
    sheet.save(path)
    return Path(path)
