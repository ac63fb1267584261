"""The evaluation as the terminal shows it: the scores table, the confidence table, the closing line.

The closing line (Evaluation.verdict) is the last line printed: it leads with the median and the
worst per-tile RMSE ratio, since a mean over tiles can hide the tiles Stage 2 made worse.
"""

from __future__ import annotations

from typing import Any

from .evaluation import LITERATURE, Evaluation

# (metric, header, decimals): the scores table's column pairs, v1 then v2
COLUMNS = (("rmse", "RMSE", 4), ("psnr", "PSNR", 2), ("ssim", "SSIM", 3), ("sam", "SAM deg", 2),
           ("ndvi_rmse", "NDVI-RMSE", 4), ("edge_preservation", "edge", 3))
NA = "n/a"
NO_REFERENCE = "RMSE without TTA needs a run without TTA over the same tiles: pass reference_dir=<its output_dir>"


def _f(v: float | None, nd: int) -> str:
    return NA if v is None else f"{v:.{nd}f}"


def _cells(scores: dict[str, Any] | None, metric: str, nd: int, width: int) -> str:
    v = None if scores is None else scores.get(metric)
    return f"{_f(v, nd) if scores is not None and metric in scores else '':>{width}}"


def scores_table(ev: Evaluation) -> list[str]:
    """Per tile, the mean over tiles and the pooled figures (all valid pixels), v1 -> v2 side by side."""
    width = max([len(t.name) for t in ev.tiles] + [10])
    widths = [max(len(h) + 3, 7) for _, h, _ in COLUMNS]
    head = f"{'tile':<{width}}  " + "  ".join(
        f"{h + ' v1':>{w}} {h + ' v2':>{w}}" + ("  v2/v1" if m == "rmse" else "")
        for (m, h, _), w in zip(COLUMNS, widths, strict=True))
    lines = ["stage2 evaluation against the truth (v1 = Stage 1 input, v2 = Stage 2 output; lower RMSE, SAM and "
             "NDVI-RMSE, higher PSNR, SSIM and edge = closer)", head, "-" * len(head)]
    rows: list[tuple[str, dict | None, dict | None, float | None]] = [
        (t.name, t.before, t.after, t.rmse_ratio) for t in ev.tiles]
    rows.append(("-" * len(head), None, None, None))
    rows.append(("mean", {m: ev.mean("before", m) for m, _, _ in COLUMNS},
                 {m: ev.mean("after", m) for m, _, _ in COLUMNS}, None))
    pooled = ev.pooled
    rows.append(("pooled", pooled["before"], pooled["after"], None))
    for name, b, a, ratio in rows:
        if b is None:
            lines.append(name)
            continue
        cells = []
        for (m, _, nd), w in zip(COLUMNS, widths, strict=True):
            ratio_cell = f"  {_ratio(ratio, name):>5}" if m == "rmse" else ""
            cells.append(f"{_cells(b, m, nd, w)} {_cells(a, m, nd, w)}{ratio_cell}")
        lines.append(f"{name:<{width}}  " + "  ".join(cells).rstrip())
    lines.append(f"pooled: every valid pixel of the {len(ev.tiles)} tiles at once ({pooled['pixels']} pixels); "
                 "mean: the mean of the per-tile values")
    return lines


def _ratio(ratio: float | None, name: str) -> str:
    return "" if name in ("mean", "pooled") else _f(ratio, 3)


def confidence_table(ev: Evaluation) -> list[str]:
    """For outputs with a std and/or a reference run: std mean, Spearman(std, |error|), RMSE beside the reference's."""
    if not ev.has_std() and ev.reference_dir is None:
        return []
    tta = ev.tta or "none"
    ref_head = f"RMSE ref (tta={ev.reference_tta or '?'})" if ev.reference_dir else "RMSE without TTA"
    width = max([len(t.name) for t in ev.tiles] + [10])
    head = (f"{'tile':<{width}}  {'std mean':>9} {'Spearman':>9} {'pixels':>9}  {f'RMSE (tta={tta})':>16} "
            f"{ref_head:>{len(ref_head)}}")
    title = ("confidence: does opt_v2_std rank the real error? per-pixel Spearman of the std with |opt_v2 - truth| "
             "(both band means)" if ev.has_std() else "RMSE of this run and of reference_dir's run")
    lines = ["", title, head, "-" * len(head)]
    for t in ev.tiles:
        c = t.confidence or {}
        ref = (t.reference or {}).get("rmse")
        lines.append(f"{t.name:<{width}}  {_f(c.get('std_mean'), 5):>9} {_f(c.get('spearman'), 3):>9} "
                     f"{c.get('pixels', ''):>9}  {_f(t.after['rmse'], 4):>16} {_f(ref, 4):>{len(ref_head)}}")
    lines.append("-" * len(head))
    lines.append(f"{'mean':<{width}}  {_f(ev.mean_of('confidence', 'std_mean'), 5):>9} "
                 f"{_f(ev.mean_of('confidence', 'spearman'), 3):>9} {'':>9}  {_f(ev.mean('after', 'rmse'), 4):>16} "
                 f"{_f(ev.mean_of('reference', 'rmse'), 4):>{len(ref_head)}}")
    sp = ev.spearman_pooled or {}
    ref_pooled = (ev.pooled.get("reference") or {}).get("rmse")
    lines.append(f"{'pooled':<{width}}  {'':>9} {_f(sp.get('spearman'), 3):>9} {sp.get('ranked', ''):>9}  "
                 f"{_f(ev.pooled['after']['rmse'], 4):>16} {_f(ref_pooled, 4):>{len(ref_head)}}")
    if sp and sp.get("ranked", 0) < sp.get("pixels", 0):
        lines.append(f"pooled Spearman over a random sample of {sp['ranked']} of {sp['pixels']} pixels "
                     f"(seed {sp['seed']})")
    if ev.reference_dir is None:
        lines.append(NO_REFERENCE)
    else:
        lines.append(f"reference_dir: {ev.reference_dir}")
    return lines


def literature_line(ev: Evaluation) -> str:
    ref = LITERATURE["DSen2-CR"]
    return (f"for scale: DSen2-CR ({ref['what']}) reports PSNR {ref['psnr']} dB, SSIM {ref['ssim']}, SAM "
            f"{ref['sam']} deg; here (opt_v2, mean over tiles) PSNR {_f(ev.mean('after', 'psnr'), 2)} dB, SSIM "
            f"{_f(ev.mean('after', 'ssim'), 3)}, SAM {_f(ev.mean('after', 'sam'), 2)} deg: another task on other data")


def format_evaluation(ev: Evaluation) -> str:
    """Everything the command prints before the file lines: the tables, notes, the literature, the verdict."""
    notes = [f"note: {n}" for n in ev.notes]
    return "\n".join([*scores_table(ev), *confidence_table(ev), *notes, literature_line(ev), ev.verdict()])
