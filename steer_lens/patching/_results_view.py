"""Tables and figures of the patching results (split out of :mod:`steer_lens.patching.results`).

The bodies of the longer ``to_pandas`` / ``plot`` methods of :class:`~steer_lens.patching.PatchResult`,
:class:`~steer_lens.patching.VectorAttribution` and :class:`~steer_lens.patching.PathPatchResult`;
the methods, with their docstrings, stay on the classes and call these. pandas and plotly are
imported when a table or figure is asked for.
"""

from __future__ import annotations

import itertools
import re

__all__ = ["attribution_table", "patch_figure", "patch_table", "path_table", "variant_parts"]


def patch_table(result):
    """:meth:`PatchResult.to_pandas`: one row per site with the axis indices, their labels, ``value``, ``effect``."""
    import pandas as pd

    rows = []
    vals = result.values.reshape(-1).tolist()
    eff = result.effect.reshape(-1).tolist()
    for flat, multi in enumerate(itertools.product(*(range(n) for n in result.values.shape))):
        row = {}
        for a, i in zip(result.axes, multi, strict=True):
            row[a] = i
            row[f"{a}_label"] = result.labels[a][i]
        row["value"] = vals[flat]
        row["effect"] = eff[flat]
        rows.append(row)
    return pd.DataFrame(rows)


def patch_figure(result, normalized: bool):
    """:meth:`PatchResult.plot`: a bar chart (1 axis), a heatmap (2 axes) or one heatmap per layer (3 axes)."""
    from steer_lens import plotting

    v = result.normalized() if normalized else result.values
    what = "fraction recovered" if normalized else result.metric_name
    title = f"{result.kind} patching of {result.hook} ({what})"
    if v.ndim == 1:
        return plotting.bar(v, result.labels[result.axes[0]], title=title, y_title=what)
    zmid = None if (result.kind != "attribution" and not normalized) else 0.0
    if v.ndim == 2:
        return plotting.heatmap(
            v,
            x_labels=result.labels[result.axes[1]],
            y_labels=result.labels[result.axes[0]],
            title=title,
            x_title=result.axes[1],
            y_title=result.axes[0],
            colorbar_title=what,
            zmid=zmid,
        )
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    flat = v.reshape(v.shape[0], v.shape[1], -1)
    fig = make_subplots(
        rows=v.shape[0],
        cols=1,
        subplot_titles=[f"{result.axes[0]} {lab}" for lab in result.labels[result.axes[0]]],
    )
    for i in range(v.shape[0]):
        fig.add_trace(
            go.Heatmap(
                z=flat[i].float().T.tolist(),
                x=result.labels[result.axes[1]],
                y=result.labels[result.axes[2]],
                colorscale="RdBu",
                zmid=0.0 if zmid is not None else None,
                coloraxis=None,
                showscale=i == 0,
            ),
            row=i + 1,
            col=1,
        )
    fig.update_layout(title=title, height=max(300, 260 * v.shape[0]))
    return fig


def attribution_table(result):
    """:meth:`VectorAttribution.to_pandas`: one row per (hook, sequence, position) with token and attribution."""
    import pandas as pd

    rows = []
    for h, hook in enumerate(result.hooks):
        for b in range(result.values.shape[1]):
            for p in range(result.values.shape[2]):
                tok = result.tokens[b][p] if result.tokens is not None else str(p)
                rows.append(
                    {
                        "hook": hook,
                        "batch": b,
                        "pos": p,
                        "token": tok,
                        "attribution": float(result.values[h, b, p]),
                    }
                )
    return pd.DataFrame(rows)


def path_table(result):
    """:meth:`PathPatchResult.to_pandas`: one row per path and per variant, then the total and the sum."""
    import pandas as pd

    tot = result.total_effect
    rows = [
        {"group": "path", "name": k, "effect": v, "fraction": v / tot if tot else float("nan")}
        for k, v in result.effects.items()
    ]
    kl = result.variant_kl or {}
    rows += [
        {"group": "variant", "name": k, "effect": v, "fraction": v / tot if tot else float("nan"),
         **variant_parts(k), "kl": float(kl[k].nanmean()) if k in kl else float("nan")}
        for k, v in result.variants.items()
    ]
    rows.append({"group": "total", "name": "total", "effect": tot, "fraction": 1.0})
    rows.append(
        {"group": "total", "name": "sum of paths", "effect": result.path_sum, "fraction": result.additivity}
    )
    df = pd.DataFrame(rows)
    if "head" in df:
        df["head"] = df["head"].astype("Int64")  # integers with <NA> for the rows without a head
    return df


def variant_parts(name: str) -> dict:
    """``kind``, ``part``, ``unit``, ``head``, ``route`` of a variant name (see :meth:`PathPatchResult.to_pandas`)."""
    m = re.fullmatch(r"(knockout|only) (?:([qkv]) )?(head|kv-head|groups|group|all heads)(?: (\d+(?:\+\d+)*))?"
                     r"(?: -> (\w+))?", name)
    if m is None:  # a whole-block variant: skip_attention, skip_layer, attn_to_*
        return {"kind": name, "part": None, "unit": None, "head": None, "route": None}
    kind, part, unit, head, route = m.groups()
    return {"kind": kind, "part": part or "z", "unit": unit, "head": None if head is None or "+" in head else int(head),
            "route": route or "all"}
