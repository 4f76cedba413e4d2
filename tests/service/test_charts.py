"""The dashboard's charts as SVG: the figures of `GET /activity` drawn to scale, readable without a script."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from ohd.service.web.charts import BAR_AREA, COLUMN_W, charts_section, per_model, throughput

SVG = "{http://www.w3.org/2000/svg}"


def hours(*counts: tuple[int, int]) -> list[dict[str, object]]:
    return [{"start": f"2026-12-07T{n:02d}:00:00+00:00", "completed": done, "failed": failed}
            for n, (done, failed) in enumerate(counts)]


def bar(group: ET.Element, kind: str) -> ET.Element:
    found = [r for r in group.iter(SVG + "rect") if kind in r.get("class", "").split()]
    assert len(found) == 1, kind
    return found[0]


def test_each_hour_is_a_bar_of_completed_under_failed_scaled_to_the_busiest_hour() -> None:
    root = ET.fromstring(throughput(hours((0, 0), (6, 2), (2, 0))))
    groups = [g for g in root.iter(SVG + "g") if g.get("class") == "hour"]
    assert [(g.get("data-completed"), g.get("data-failed")) for g in groups] == [("0", "0"), ("6", "2"), ("2", "0")]
    busiest = groups[1]
    done, failed = bar(busiest, "completed"), bar(busiest, "failed")
    assert float(done.get("height", 0)) + float(failed.get("height", 0)) == BAR_AREA     # the tallest hour
    assert float(done.get("height", 0)) == pytest.approx(BAR_AREA * 6 / 8, abs=0.06)
    assert float(failed.get("y", 0)) + float(failed.get("height", 0)) == float(done.get("y", 0))   # on top
    assert float(bar(groups[2], "completed").get("height", 0)) == pytest.approx(BAR_AREA * 2 / 8, abs=0.06)
    assert float(bar(groups[0], "completed").get("height", 0)) == 0
    assert "01:00 UTC: 6 completed, 2 failed" in (busiest.findtext(SVG + "title") or "")
    assert root.get("aria-label") == "Tasks per hour over the last 3 hours (UTC): 8 completed, 2 failed"


def test_a_quiet_day_draws_empty_bars() -> None:
    root = ET.fromstring(throughput(hours(*[(0, 0)] * 24)))
    assert {r.get("height") for r in root.iter(SVG + "rect") if "completed" in r.get("class", "")} == {"0.0"}


def test_each_model_is_a_row_of_calls_tokens_and_cost_scaled_to_the_largest() -> None:
    models = [{"model": "a/m:free", "calls": 4, "accepted": 2, "rejected": 1, "other": 1, "prompt_tokens": 900,
               "completion_tokens": 100, "cost": 0.0},
              {"model": "b/<m>", "calls": 8, "accepted": 8, "rejected": 0, "other": 0, "prompt_tokens": 400,
               "completion_tokens": 100, "cost": 0.02}]
    root = ET.fromstring(per_model(models))
    rows = {g.get("data-model"): g for g in root.iter(SVG + "g") if g.get("class") == "model"}
    assert set(rows) == {"a/m:free", "b/<m>"}              # escaped in the markup, the name itself here
    a, b = rows["a/m:free"], rows["b/<m>"]
    assert [float(bar(a, k).get("width", 0)) for k in ("accepted", "rejected", "other")] == \
        pytest.approx([COLUMN_W * 2 / 8, COLUMN_W * 1 / 8, COLUMN_W * 1 / 8], abs=0.06)   # drawn to 0.1 px
    assert float(bar(b, "accepted").get("width", 0)) == COLUMN_W
    assert float(bar(a, "tokens").get("width", 0)) == COLUMN_W and float(bar(b, "tokens").get("width", 0)) == \
        COLUMN_W / 2
    assert float(bar(a, "cost").get("width", 0)) == 0 and float(bar(b, "cost").get("width", 0)) == COLUMN_W
    assert "$0.0200" in "".join(b.itertext())


def test_the_section_reads_without_script_or_inline_style() -> None:
    html = charts_section({"hours": hours((1, 0)), "models": []})
    assert "<script" not in html and "style=" not in html
    assert "no model calls in these hours" in html and re.search(r'id=charts data-live', html)
