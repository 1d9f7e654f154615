"""Plotly figures and circuitsvis views shared by the result classes. No analysis logic lives here.

Every function returns a figure (plotly ``Figure`` or a circuitsvis ``RenderedHTML``); none calls
``.show()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["bar", "heatmap", "metric_panels", "result_html", "token_view", "top_tokens_table"]


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


def heatmap(values: Tensor, *, x_labels: Sequence[str], y_labels: Sequence[str], title: str = "",
            x_title: str = "", y_title: str = "", colorbar_title: str = "", zmid: float | None = 0.0):
    """A diverging heatmap of a 2-D tensor (rows = ``y_labels``, columns = ``x_labels``)."""
    import plotly.graph_objects as go

    v = values.detach().float().cpu()
    fig = go.Figure(go.Heatmap(z=v.tolist(), x=[f"{i}: {s}" for i, s in enumerate(x_labels)],
                               y=list(y_labels), colorscale="RdBu", zmid=zmid,
                               colorbar={"title": colorbar_title}))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title)
    return fig


def bar(values: Tensor, labels: Sequence[str], *, title: str = "", y_title: str = ""):
    """A bar chart of a 1-D tensor."""
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(x=list(labels), y=values.detach().float().cpu().tolist()))
    fig.update_layout(title=title, yaxis_title=y_title)
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


def token_view(tokens: Sequence[str], values: Tensor):
    """circuitsvis colored-tokens view of one value per token (e.g. a gate or an attribution)."""
    from circuitsvis.tokens import colored_tokens

    return colored_tokens(tokens=list(tokens), values=values.detach().float().cpu().tolist())


def result_html(summary: str, table) -> str:
    """HTML of a result for Jupyter: a summary line above a table (a ``pandas.DataFrame``).

    Args:
        summary: HTML of the summary line (already escaped by the caller).
        table: the rows to show; floats are printed with 4 significant digits.
    """
    body = table.to_html(index=False, float_format=lambda v: f"{v:.4g}")
    return f"<div><p>{summary}</p>{body}</div>"
