"""Text tables and row exports: `camanim.LayerTable` printed and exported,
and the aligned columns that ``camanim layers`` prints."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import CAManimError

__all__ = ["layer_records", "layer_table_text", "records_dataframe", "text_table"]


def text_table(head: Sequence[str], rows: Sequence[Sequence[str]],
               right: Sequence[str] = ()) -> str:
    """Rows of strings as aligned text columns under a header and a rule;
    the columns named in ``right`` are right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(head)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if h in right else c.ljust(w)
                         for c, w, h in zip(cells, widths, head, strict=True)).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _shape(shape: Sequence[int]) -> str:
    """Per-image output shape (the batch dimension dropped): ``64x56x56``."""
    return "x".join(str(v) for v in shape[1:]) if len(shape) > 1 else "-"


def layer_records(table: Any) -> list[dict[str, Any]]:
    """One dict per selected layer of a `LayerTable`, then per skipped one:
    ``index`` (in the selection; ``None`` when skipped), ``name``, ``type``,
    ``output_shape`` (per image), ``params`` (module and children),
    ``layout``, ``skipped`` (the reason, or ``None``)."""
    rows: list[tuple[int | None, Any]] = [(i, info) for i, info in enumerate(table.selected)]
    rows += [(None, info) for info in table.skipped]
    return [{"index": i, "name": info.name, "type": info.type,
             "output_shape": tuple(info.output_shape[1:]), "params": info.params_total,
             "layout": info.layout, "skipped": info.skipped} for i, info in rows]


def records_dataframe(records: list[dict[str, Any]], what: str) -> Any:
    """``records`` as a ``pandas.DataFrame``; pandas is imported here only."""
    try:
        import pandas as pd
    except ImportError:
        raise CAManimError(f"{what} needs pandas (pip install pandas); to_records() gives "
                           "the same rows as dicts") from None
    return pd.DataFrame.from_records(records)


def layer_table_text(table: Any) -> str:
    """A `LayerTable` as text: the selected layers (index, name, type,
    output shape, parameters, layout), a count, then the skipped ones with
    the reason."""
    rows = [(str(i), x.name, x.type, _shape(x.output_shape), f"{x.params_total:,}", x.layout)
            for i, x in enumerate(table.selected)]
    out = [text_table(("#", "name", "type", "output shape", "params", "layout"), rows,
                      right=("#", "params")),
           f"{len(table.selected)} layers selected of {len(table.calls)} module calls "
           "(output shape per image: CxHxW for nchw, HxWxC for nhwc)"]
    if table.skipped:
        skipped = [(x.name, x.type, _shape(x.output_shape), x.skipped or "")
                   for x in table.skipped]
        out += [f"\nskipped ({len(table.skipped)}):",
                text_table(("name", "type", "output shape", "reason"), skipped)]
    return "\n".join(out)
