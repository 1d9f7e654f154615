"""Plotly figures and circuitsvis views of the analysis results. No analysis logic lives here.

The results (:class:`steer_lens.results.Result`) decide what to show; the functions here decide how.
They are small builders that compose: a panel function (:func:`bar`, :func:`bars`, :func:`heatmap`,
:func:`lines`, :func:`histogram`, :func:`metric_panels`, :func:`top_tokens_table`) returns one
figure, and :func:`grid` lays several figures out as the panels of one.

Every function returns a figure (plotly ``Figure``, a circuitsvis ``RenderedHTML``, or HTML text for
:func:`result_html`); none calls ``.show()``. plotly and circuitsvis are imported when a figure is
built.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "bar",
    "bars",
    "grid",
    "heatmap",
    "histogram",
    "lines",
    "metric_panels",
    "result_html",
    "token_view",
    "top_tokens_table",
]


def _floats(values: Tensor | Iterable[float]) -> list[float]:
    """Values as Python floats (a tensor, a list, a pandas Series ...)."""
    if isinstance(values, Tensor):
        return values.detach().float().cpu().tolist()
    return [float(v) for v in values]


def metric_panels(metrics: Mapping[str, Tensor], *, title: str = "", x_title: str = "step"):
    """One line panel per metric (NaN steps are skipped), stacked vertically.

    Args:
        metrics: ``{name: Float[Tensor, "steps"]}``.
        title: figure title.
        x_title: label of the shared x axis.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = list(metrics)
    fig = make_subplots(rows=len(names), cols=1, shared_xaxes=True, subplot_titles=names,
                        vertical_spacing=min(0.08, 0.5 / max(1, len(names))))
    for i, name in enumerate(names, start=1):
        y = metrics[name].detach().float().cpu()
        x = torch.arange(y.shape[0])
        ok = ~torch.isnan(y)
        fig.add_trace(go.Scatter(x=x[ok].tolist(), y=y[ok].tolist(), mode="lines+markers" if ok.sum() < 30
                                 else "lines", name=name, showlegend=False), row=i, col=1)
    fig.update_layout(title=title, height=max(300, 220 * len(names)))
    fig.update_xaxes(title_text=x_title, row=len(names), col=1)
    return fig


_INDEXED = re.compile(r"^\d+: ")


def heatmap(values: Tensor, *, x_labels: Sequence[str], y_labels: Sequence[str], title: str = "",
            x_title: str = "", y_title: str = "", colorbar_title: str = "", zmid: float | None = 0.0,
            text: Sequence[Sequence[str]] | None = None, colorscale: str = "RdBu",
            zmin: float | None = None, zmax: float | None = None, index_x: bool = True):
    """A heatmap of a 2-D tensor (rows = ``y_labels``, columns = ``x_labels``), diverging by default.

    Args:
        values: ``[rows, columns]``.
        x_labels, y_labels: one label per column / row (columns are prefixed by their index when
            ``index_x``, so repeated tokens stay apart; a label that already starts with ``"<n>: "``,
            e.g. a position, is kept as it is).
        text: a label printed in each cell (e.g. the top token), ``[rows][columns]``.
        colorscale, zmid, zmin, zmax: plotly's colour settings (``zmid=None`` for a sequential scale).
    """
    import plotly.graph_objects as go

    v = values.detach().float().cpu()
    x = [s if _INDEXED.match(str(s)) else f"{i}: {s}" for i, s in enumerate(x_labels)] if index_x else list(x_labels)
    cell = {"text": [list(r) for r in text], "texttemplate": "%{text}"} if text is not None else {}
    fig = go.Figure(go.Heatmap(z=v.tolist(), x=x, y=list(y_labels), colorscale=colorscale, zmid=zmid,
                               zmin=zmin, zmax=zmax, colorbar={"title": colorbar_title}, **cell))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title)
    return fig


def bar(values: Tensor | Iterable[float], labels: Sequence[str], *, title: str = "", y_title: str = "",
        x_title: str = "", hovertext: Sequence[str] | None = None, color: str | None = None):
    """A bar chart of one value per label."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(x=list(labels), y=_floats(values), hovertext=hovertext, marker_color=color))
    fig.update_layout(title=title, yaxis_title=y_title, xaxis_title=x_title)
    return fig


def bars(series: Mapping[str, tuple[Sequence[str], Tensor | Iterable[float]]], *, title: str = "",
         y_title: str = "", x_title: str = "", hovertext: Mapping[str, Sequence[str]] | None = None):
    """Grouped bars: one trace per series, ``{name: (labels, values)}`` (labels may differ per series)."""
    import plotly.graph_objects as go

    hovertext = hovertext or {}
    fig = go.Figure([go.Bar(name=name, x=list(x), y=_floats(y), hovertext=hovertext.get(name))
                     for name, (x, y) in series.items()])
    fig.update_layout(title=title, yaxis_title=y_title, xaxis_title=x_title, barmode="group")
    return fig


def lines(series: Mapping[str, tuple[Sequence[Any], Tensor | Iterable[float]]], *, title: str = "",
          y_title: str = "", x_title: str = "", error_y: Mapping[str, Sequence[float]] | None = None):
    """Lines with markers, ``{name: (x, y)}``; NaN points are left out."""
    import plotly.graph_objects as go

    error_y = error_y or {}
    fig = go.Figure()
    for name, (x, y) in series.items():
        ys = _floats(y)
        ok = [i for i, v in enumerate(ys) if v == v]
        err = {"array": [error_y[name][i] for i in ok]} if name in error_y else None
        fig.add_trace(go.Scatter(x=[list(x)[i] for i in ok], y=[ys[i] for i in ok], mode="lines+markers",
                                 name=name, legendgroup=name, error_y=err))
    fig.update_layout(title=title, yaxis_title=y_title, xaxis_title=x_title)
    return fig


def histogram(values: Tensor, *, title: str = "", x_title: str = "", y_title: str = "", nbins: int = 50):
    """A histogram of a 1-D tensor."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Histogram(x=values.detach().double().cpu().numpy(), nbinsx=nbins))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title)
    return fig


def grid(panels: Sequence[Sequence[Any]], *, titles: Sequence[str] | None = None, title: str = "",
         height: int | None = None, shared_xaxes: bool = False, showlegend: bool | None = None):
    """Figures laid out as the panels of one figure (rows of columns); each keeps its axis titles.

    Args:
        panels: ``[[fig, fig, ...], ...]``, one inner list per row (all rows equally long).
        titles: one title per panel, row by row (default: each figure's own title).
        title: the figure's title.
        height: pixels (default ``max(300, 320 * rows)``).
        shared_xaxes: share the x axis down each column.
        showlegend: show the legend (default: plotly's).
    """
    from plotly.subplots import make_subplots

    rows, cols = len(panels), len(panels[0])
    flat = [f for row in panels for f in row]
    titles = list(titles) if titles is not None else [f.layout.title.text or "" for f in flat]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, shared_xaxes=shared_xaxes,
                        vertical_spacing=min(0.12, 0.5 / max(1, rows)))
    for i, f in enumerate(flat):
        r, c = divmod(i, cols)
        for trace in f.data:
            if showlegend is False:
                trace.showlegend = False
            fig.add_trace(trace, row=r + 1, col=c + 1)
        fig.update_xaxes(title_text=f.layout.xaxis.title.text, row=r + 1, col=c + 1)
        fig.update_yaxes(title_text=f.layout.yaxis.title.text, row=r + 1, col=c + 1)
        if f.layout.barmode:
            fig.update_layout(barmode=f.layout.barmode)
    fig.update_layout(title=title, height=height or max(300, 320 * rows))
    if showlegend is not None:
        fig.update_layout(showlegend=showlegend)
    return fig


def top_tokens_table(columns: Mapping[str, tuple[Sequence[str], Tensor]], *, title: str = ""):
    """A plotly table: for each column name, ranked tokens with their values."""
    import plotly.graph_objects as go

    header = []
    cells = []
    for name, (tokens, vals) in columns.items():
        header += [name, "value"]
        cells += [[repr(t) for t in tokens], [f"{float(x):+.3f}" for x in vals]]
    fig = go.Figure(go.Table(header={"values": header}, cells={"values": cells}))
    fig.update_layout(title=title, height=max(300, 24 * max(len(c) for c in cells) + 120))
    return fig


def token_view(tokens: Sequence[str] | Sequence[Sequence[str]], values: Tensor | Sequence[Any]):
    """circuitsvis colored-tokens view of one value per token (e.g. a gate, a shift, an attribution).

    Args:
        tokens: ``[pos]`` token strings, or several texts ``[[pos_i], ...]`` (shown one per line).
        values: ``[pos]``, or one ``[pos_i]`` tensor / list per text.
    """
    from circuitsvis.tokens import colored_tokens

    if tokens and not isinstance(tokens[0], str):  # several texts: one line each
        flat_t: list[str] = []
        flat_v: list[float] = []
        for toks, vals in zip(tokens, values, strict=True):
            flat_t += [*toks, "\n"]
            flat_v += [*_floats(vals), 0.0]
        return colored_tokens(tokens=flat_t, values=flat_v)
    return colored_tokens(tokens=list(tokens), values=_floats(values))


def result_html(summary: str, table) -> str:
    """HTML of a result for Jupyter: a summary line above a table (a ``pandas.DataFrame``).

    Args:
        summary: HTML of the summary line (already escaped by the caller).
        table: the rows to show; floats are printed with 4 significant digits.
    """
    body = table.to_html(index=False, float_format=lambda v: f"{v:.4g}")
    return f"<div><p>{summary}</p>{body}</div>"
