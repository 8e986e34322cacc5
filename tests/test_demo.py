"""demo.py helpers (the full `make demo` run is too slow for the suite)."""

from __future__ import annotations

import csv

import demo


def test_per_type_markdown_from_per_sample_csv(tmp_path):
    rows = [("the red circle", 1.0), ("the circle", 0.5), ("the small circle", 0.2),
            ("the leftmost shape", 0.0), ("the circle left of the red square", 0.9)]
    with open(tmp_path / "per_sample_val_lavt.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "ref_id", "sent_id", "image_id", "sentence", "iou"])
        for i, (s, iou) in enumerate(rows):
            w.writerow([i, i, i, 1, s, iou])
    table = demo.per_type_markdown(tmp_path, ("val",)).splitlines()
    assert table[0] == "| split | attribute | size | extreme_shape | extreme_any | relation |"
    assert table[2] == "| val | 75.0 (2) | 20.0 (1) | - | 0.0 (1) | 90.0 (1) |"
