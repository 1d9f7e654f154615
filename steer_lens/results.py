"""One protocol for every analysis result: a table, a figure, the top rows, a token view, HTML.

Analyses return small frozen dataclasses holding CPU tensors (see ``../shared/GUIDE.md``). Mixing in
:class:`Result` gives each of them the same surface:

* :meth:`Result.to_pandas` - the result as a ``pandas.DataFrame`` (each result defines it);
* :meth:`Result.top` - the ``k`` rows that matter most, always a ``DataFrame`` (by default the
  table sorted by :attr:`Result._rank_by`, or its first ``k`` rows when the table is already ranked);
* :meth:`Result.plot` - a plotly ``Figure`` built in :mod:`steer_lens.plotting` (never ``.show()``);
* :meth:`Result.token_view` - the circuitsvis coloured-tokens view, for results with one value per
  token (the others raise :class:`~steer_lens.errors.ConfigError` naming the results that have one);
* ``_repr_html_`` - a one-line summary (:meth:`Result._summary`) above :meth:`top` as an HTML table,
  rendered by :func:`steer_lens.plotting.result_html`.

Rendering stays apart from data (as penzai keeps its treescope views apart from the model): a result
decides *what* to show, :mod:`steer_lens.plotting` decides *how*.

Usage::

    @dataclass(frozen=True, kw_only=True)
    class MyResult(Result):
        hooks: list[str]
        values: Float[Tensor, " n_hooks"]
        _rank_by: ClassVar[str] = "value"

        def to_pandas(self):
            import pandas as pd
            return pd.DataFrame({"hook": self.hooks, "value": self.values.tolist()})

        def plot(self):
            from steer_lens import plotting
            return plotting.bar(self.values, self.hooks, title="values")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from steer_lens.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["Result"]


class Result:
    """Mixin of the analysis results (frozen dataclasses with CPU tensors).

    Subclasses define :meth:`to_pandas` and :meth:`plot`; they may set :attr:`_rank_by` (the column
    :meth:`top` sorts by, descending; by absolute value when :attr:`_rank_abs`), override :meth:`top`
    when the ranking needs more than one column, override :meth:`_summary` for the HTML header, and
    override :meth:`token_view` when they hold one value per token.
    """

    _rank_by: ClassVar[str | None] = None
    """Column of :meth:`to_pandas` that :meth:`top` sorts by (``None``: the table is already ranked)."""
    _rank_abs: ClassVar[bool] = False
    """Whether :meth:`top` sorts by the absolute value of :attr:`_rank_by`."""
    _html_rows: ClassVar[int] = 20
    """Rows of :meth:`top` shown by ``_repr_html_``."""

    def to_pandas(self) -> pd.DataFrame:
        """The result as a table (one row per site / token / feature ...)."""
        raise NotImplementedError(f"{type(self).__name__} defines no table (to_pandas).")

    def plot(self) -> Any:
        """The result as a plotly ``Figure`` (built in :mod:`steer_lens.plotting`; never shown)."""
        raise NotImplementedError(f"{type(self).__name__} defines no figure (plot).")

    def top(self, k: int = 10) -> pd.DataFrame:
        """The ``k`` most important rows of :meth:`to_pandas`, most important first.

        Sorted by the column :attr:`_rank_by` (descending; by absolute value when :attr:`_rank_abs`),
        or the first ``k`` rows when the table is already ranked. The index is reset to ``0..k-1``.

        Raises:
            ConfigError: ``k`` is not a positive integer.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"k: expected a positive integer, got {k!r}.")
        df = self.to_pandas()
        if self._rank_by is not None and len(df):
            key = df[self._rank_by].abs() if self._rank_abs else df[self._rank_by]
            df = df.loc[key.sort_values(ascending=False, kind="stable").index]
        return df.head(k).reset_index(drop=True)

    def token_view(self, *args: Any, **kwargs: Any) -> Any:
        """circuitsvis coloured-tokens view of one value per token (renders in Jupyter).

        Raises:
            ConfigError: this result holds no per-token values.
        """
        raise ConfigError(
            f"{type(self).__name__} holds no per-token values, so it has no token view. Results with one: "
            "ActivationShift, GateValues, FeatureTopTokens, PatchResult (with a 'pos' axis)."
        )

    def _summary(self) -> str:
        """One line of HTML above the table in ``_repr_html_`` (default: the class name)."""
        return f"<b>{type(self).__name__}</b>"

    def _repr_html_(self) -> str:
        from steer_lens.plotting import result_html

        return result_html(self._summary(), self.top(self._html_rows))
