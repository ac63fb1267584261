"""The report's `index.html`: one self-contained page, opened straight from the file system.

A `string.Template` and `html.escape` on every piece of text (tile names, metadata and failure
reasons come from user files). Images are linked by relative path, so the folder can be copied or
zipped as a whole; no server, no web framework, no external CSS or script. A few lines of inline
script sort the table and say so on the page when an image did not load (e.g. index.html was moved
without its PNGs); the page reads fine without them.
"""

from __future__ import annotations

import html
import json
from datetime import datetime, timezone
from string import Template
from typing import Any
from urllib.parse import quote

from ..quality import EDGE_PRESERVATION_TARGET, NDVI_RMSE_TARGET
from .check import RunCheck, TileRow
from .figures import CHANGE_VMAX, STD_VMAX

SUMMARY_ORDER = ("found", "processed", "skipped", "failed", "ignored", "metadata_defaults", "clipped",
                 "cpu_fallbacks", "tiles_per_s", "wall_s", "device", "precision", "batch_size", "model",
                 "checkpoint", "input_dir", "output_dir", "stage2_version")

PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>stage2 report: $title</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 1400px;
       padding: 0 1em; color: #222; line-height: 1.4; }
h1 { margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.tiles th { cursor: pointer; user-select: none; }
tr.below td { background: #fdf3e1; }
.bad { color: #b00020; font-weight: 600; }
.changed { color: #9a5b00; font-weight: 600; }
.ok { color: #1b7f3b; font-weight: 600; }
[hidden] { display: none !important; }
.status { font-size: 1.1em; padding: 0.4em 0.8em; border-radius: 4px; display: inline-block; }
.status.ok { background: #e6f4ea; }
.status.bad { background: #fdecee; }
.muted { color: #666; }
code { background: #f3f3f3; padding: 0 0.2em; }
img.wide { max-width: 100%; height: auto; border: 1px solid #ddd; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #444; }
nav a { margin-right: 1em; }
</style>
</head>
<body data-images="pending">
<h1>stage2 report</h1>
<nav><a href="#checks">checks</a><a href="#run">run summary</a><a href="#failures">failures</a>
<a href="#quality">quality</a><a href="#tiles">tiles</a><a href="#figures">figures</a></nav>
<p class="status $status_class">$status_text</p>
<p id="broken" class="status bad" hidden></p>
<table>
<tr><th>output_dir</th><td><code>$output_dir</code></td></tr>
<tr><th>input_dir</th><td><code>$input_dir</code></td></tr>
<tr><th>report written</th><td>$generated</td></tr>
</table>

<h2 id="checks">Checks</h2>
$checks

<h2 id="run">Run summary</h2>
$run_summary

<h2 id="failures">Failures</h2>
$failures

<h2 id="quality">Quality</h2>
<p id="change-not-error"><b>These metrics measure how much Stage 2 changed each tile, not its error.</b>
Both compare opt_v2 with opt_v1, Stage 2's own input, so a tile that Stage 2 brought much closer to the
ground also "changes" a lot. The error of a tile needs the true optical tile:
<code>python -m stage2.evaluate truth_dir=DIR input_dir=... output_dir=...</code> scores opt_v1 and
opt_v2 against it (RMSE, PSNR, SSIM, SAM, NDVI RMSE, edge preservation).</p>
<p><b>NDVI RMSE</b>: root-mean-square difference between the NDVI of opt_v1 and opt_v2
(the guide's preservation target &lt; $rmse_target: the refinement should keep the vegetation signal).
<b>Edge preservation</b>: Pearson correlation of the Sobel gradient magnitude of the NIR band (B08)
of opt_v1 and opt_v2 (target &gt; $edge_target: it should not blur or invent field boundaries).
A tile whose NIR has no edges at all is <i>flat</i>: its edge preservation is undefined (null).
$confidence_note</p>
<img class="wide" src="$quality_png" alt="histograms of NDVI RMSE and edge preservation with the target lines">

<h2 id="tiles">Tiles ($n_rows)</h2>
<p class="muted">Most changed first (distance from the preservation targets); click a column header to sort.
Rows of tiles that changed more than the targets are shaded. $figure_note$computed_note</p>
<table class="tiles" id="tile-table">
<thead><tr><th data-type="num">#</th><th>tile</th><th data-type="num">month</th><th data-type="num">biome</th>
<th data-type="num">NDVI RMSE</th><th data-type="num">edge preservation</th>$extra_heads
<th>status</th><th>figure</th></tr></thead>
<tbody>
$rows
</tbody>
</table>

<h2 id="figures">Figures</h2>
<p class="muted">opt_v1 RGB | opt_v2 RGB | NDVI difference | change |opt_v2 - opt_v1| (mean over the
bands, fixed scale 0-$change_vmax reflectance)$std_panel, most changed first.</p>
$gallery

<script>
(function () {
  // Say on the page when an image did not load (index.html moved without its PNGs).
  window.addEventListener("load", function () {
    var imgs = document.images, bad = [];
    for (var i = 0; i < imgs.length; i++) {
      if (!imgs[i].complete || imgs[i].naturalWidth === 0) bad.push(imgs[i].getAttribute("src"));
    }
    document.body.setAttribute("data-images", bad.length ? "broken" : "ok");
    document.body.setAttribute("data-images-loaded", (imgs.length - bad.length) + "/" + imgs.length);
    if (bad.length) {
      var p = document.getElementById("broken");
      p.textContent = bad.length + " image(s) did not load: " + bad.join(", ") +
        " (keep index.html in its folder with quality.png and tiles/)";
      p.hidden = false;
    }
  });
  // Sort the tile table by a clicked column; empty cells stay last.
  var table = document.getElementById("tile-table");
  var heads = table.tHead.rows[0].cells;
  for (var c = 0; c < heads.length; c++) {
    heads[c].addEventListener("click", (function (col, th) {
      return function () {
        var asc = th.getAttribute("aria-sort") !== "ascending";
        for (var k = 0; k < heads.length; k++) heads[k].removeAttribute("aria-sort");
        th.setAttribute("aria-sort", asc ? "ascending" : "descending");
        var num = th.getAttribute("data-type") === "num";
        var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = a.cells[col].getAttribute("data-v"), y = b.cells[col].getAttribute("data-v");
          if (x === null) x = a.cells[col].textContent;
          if (y === null) y = b.cells[col].textContent;
          if (x === "" || y === "") return (x === "") - (y === "");
          var d = num ? parseFloat(x) - parseFloat(y) : x.localeCompare(y);
          return asc ? d : -d;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      };
    })(c, heads[c]));
  }
})();
</script>
</body>
</html>
""")


def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def href(rel: str) -> str:
    """A relative link that survives odd characters in tile names."""
    return esc(quote(rel))


def _num(x: Any, digits: int) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _kv_table(pairs: list[tuple[str, Any]]) -> str:
    rows = "\n".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in pairs)
    return f"<table>\n{rows}\n</table>"


def _checks(chk: RunCheck) -> str:
    counts = _kv_table([("input tiles", chk.inputs), ("complete, valid outputs", chk.outputs),
                        ("problems", len(chk.problems)), ("failures recorded by the run", len(chk.failures))])
    if not chk.problems:
        body = '<p class="ok">Every input has a complete output with the right shape and values in [0, 1].</p>'
    else:
        rows = "\n".join(f"<tr><td class=\"bad\">{esc(p.kind)}</td><td>{esc(p.name)}</td><td>{esc(p.detail)}</td></tr>"
                         for p in chk.problems)
        body = f"<table>\n<tr><th>problem</th><th>tile</th><th>detail</th></tr>\n{rows}\n</table>"
    notes = "".join(f"<p class=\"muted\">{esc(n)}</p>\n" for n in chk.notes)
    return f"{counts}\n{body}\n{notes}"


def _run_summary(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return "<p class=\"muted\">No <code>_stage2_summary.json</code> in output_dir.</p>"
    keys = [k for k in SUMMARY_ORDER if k in summary]
    keys += [k for k in summary if k not in keys and k not in ("quality", "first_failures")]
    pairs = [(k, summary[k] if not isinstance(summary[k], (dict, list)) else json.dumps(summary[k]))
             for k in keys]
    out = _kv_table(pairs)
    q = summary.get("quality")
    if isinstance(q, dict):
        rows = []
        for key, label, target in (("ndvi_rmse", "NDVI RMSE", f"&lt; {NDVI_RMSE_TARGET:.2f}"),
                                   ("edge_preservation", "edge preservation", f"&gt; {EDGE_PRESERVATION_TARGET:.2f}")):
            m = q.get(key) if isinstance(q.get(key), dict) else {}
            rows.append(f"<tr><td>{label}</td><td class=\"num\">{esc(_num(m.get('mean'), 4))}</td>"
                        f"<td class=\"num\">{esc(_num(m.get('worst'), 4))}</td><td>{esc(m.get('worst_tile'))}</td>"
                        f"<td>{target}</td></tr>")
        out += ("\n<p>Change against opt_v1 over the tiles this run processed: "
                f"{esc(q.get('below_target'))} changed more than the preservation targets (<code>below_target</code>), "
                f"{esc(q.get('undefined'))} undefined (flat).</p>\n"
                "<table>\n<tr><th>metric</th><th>mean</th><th>worst</th><th>worst tile</th><th>target</th></tr>\n"
                + "\n".join(rows) + "\n</table>")
    return out


def _failures(failures: list[dict[str, Any]]) -> str:
    if not failures:
        return "<p class=\"ok\">No failures recorded (<code>_stage2_failures.jsonl</code>).</p>"
    rows = "\n".join(f"<tr><td>{esc(f.get('file'))}</td><td>{esc(f.get('reason'))}</td>"
                     f"<td>{esc(f.get('hint'))}</td></tr>"
                     for f in failures)
    return f"<table>\n<tr><th>file</th><th>reason</th><th>what to do</th></tr>\n{rows}\n</table>"


def _status(row: TileRow) -> tuple[str, str]:
    if row.quality_from == "none":
        return "no metrics (input unreadable)", "muted"
    if row.below:
        return "changed more than target", "changed"
    if row.flat:
        return "flat (edge undefined)", "muted"
    return "ok", "ok"


# Columns shown where at least one tile has the value: (TileRow attribute, header, decimals)
CONFIDENCE_COLUMNS = (("std_mean", "std mean (TTA)", 5), ("mean_change", "mean change |opt_v2 - opt_v1|", 4))


def _columns(rows: list[TileRow]) -> list[tuple[str, str, int]]:
    return [c for c in CONFIDENCE_COLUMNS if any(getattr(r, c[0]) is not None for r in rows)]


def _row(i: int, row: TileRow, columns: list[tuple[str, str, int]]) -> str:
    text, cls = _status(row)
    name = f'<a href="{href(row.png)}">{esc(row.name)}</a>' if row.png else esc(row.name)
    fig = f'<a href="{href(row.png)}">PNG</a>' if row.png else ""
    mark = "*" if row.quality_from == "computed" else ""
    cells = [
        f'<td class="num">{i}</td>', f"<td>{name}</td>",
        f'<td class="num">{esc(row.month)}</td>', f'<td class="num">{esc(row.biome)}</td>',
        f'<td class="num" data-v="{esc(_num(row.ndvi_rmse, 6))}">{esc(_num(row.ndvi_rmse, 4))}{mark}</td>',
        f'<td class="num" data-v="{esc(_num(row.edge_preservation, 6))}">'
        f'{esc(_num(row.edge_preservation, 3) or "null")}{mark}</td>',
        *(f'<td class="num" data-v="{esc(_num(getattr(row, key), 7))}">{esc(_num(getattr(row, key), digits))}</td>'
          for key, _, digits in columns),
        f'<td class="{cls}">{esc(text)}</td>', f"<td>{fig}</td>",
    ]
    attr = ' class="below"' if row.below else ""
    return f"<tr{attr}>{''.join(cells)}</tr>"


def _confidence_note(has_std: bool) -> str:
    """What the change map and the std map say, and what they do not."""
    text = ("<b>Change</b>: |opt_v2 - opt_v1|, the mean over the four bands, per pixel in each figure and its mean "
            "over the tile in the table: where and how much Stage 2 altered its input (again not an error).")
    if has_std:
        text += (" <b>Std</b>: the per-pixel standard deviation of the test-time augmentation passes "
                 "(<code>opt_v2_std</code>, mean over the bands): where the model answers differently for the "
                 "flipped and rotated tile, it is unsure. How well it ranks the real error is measured by "
                 "<code>python -m stage2.evaluate</code> against a truth (Spearman of std and error).")
    return text


def render_index(chk: RunCheck, rows: list[TileRow], quality_png: str, max_tiles: int) -> str:
    """The whole page; `rows` in the order the table shows them (most changed first)."""
    n_png = sum(r.png is not None for r in rows)
    if chk.ok:
        status, status_class = f"All {chk.inputs} inputs have a valid output.", "ok"
    else:
        status, status_class = f"{len(chk.problems)} problem(s): see Checks below.", "bad"
    below = sum(r.below for r in rows)
    if rows:
        status += (f" {below} of {len(rows)} tiles changed more than the guide's preservation targets: a measure of "
                   "how much Stage 2 changed them against opt_v1, not of their error (error needs a truth: "
                   "python -m stage2.evaluate truth_dir=...).")
    columns = _columns(rows)
    has_std = any(r.std_mean is not None for r in rows)
    gallery = "\n".join(
        f'<figure id="fig-{i}"><a href="{href(r.png)}"><img src="{href(r.png)}" alt="{esc(r.name)}: opt_v1, opt_v2, '
        f'NDVI difference, change{" and std" if r.std_mean is not None else ""}"></a>'
        f'<figcaption>{i}. {esc(r.name)}</figcaption></figure>'
        for i, r in enumerate(rows, 1) if r.png)
    computed = any(r.quality_from == "computed" for r in rows)
    return PAGE.substitute(
        title=esc(chk.shown[1].rsplit("/", 1)[-1] if chk.shown else chk.output_dir.name or str(chk.output_dir)),
        status_text=esc(status), status_class=status_class,
        output_dir=esc(chk.shown[1] if chk.shown else chk.output_dir.resolve()),
        input_dir=esc(chk.shown[0] if chk.shown else chk.input_dir.resolve()),
        generated=esc(datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")),
        checks=_checks(chk), run_summary=_run_summary(chk.summary), failures=_failures(chk.failures),
        rmse_target=f"{NDVI_RMSE_TARGET:.2f}", edge_target=f"{EDGE_PRESERVATION_TARGET:.2f}",
        quality_png=href(quality_png), n_rows=len(rows),
        figure_note=esc(f"Figures for the {n_png} most changed tiles (max_tiles={max_tiles})."),
        computed_note=(" * computed by the report: the run wrote no quality (quality=false)." if computed else ""),
        extra_heads="".join(f'<th data-type="num">{esc(head)}</th>' for _, head, _ in columns),
        rows="\n".join(_row(i, r, columns) for i, r in enumerate(rows, 1)),
        confidence_note=_confidence_note(has_std), change_vmax=f"{CHANGE_VMAX:g}",
        std_panel=(f" | std across the TTA passes (mean over the bands, fixed scale 0-{STD_VMAX:g})"
                   if has_std else ""),
        gallery=gallery or '<p class="muted">No figures (max_tiles=0 or no valid outputs).</p>',
    )
