"""A changelist paginator that never counts a large table exactly.

``COUNT(*)`` reads every row (PostgreSQL and InnoDB keep no exact row count), so on a ledger of
millions of rows the changelist would spend seconds counting on each page view. This paginator
counts exactly only up to a limit: past it, the unfiltered table's size comes from PostgreSQL's
planner statistics (``pg_class.reltuples``), and any other query is counted up to the limit
only (a ``COUNT`` over a ``LIMIT`` subquery, which stops reading there).
"""

from __future__ import annotations

from typing import Any

from django.core.paginator import Paginator
from django.db import connections
from django.db.models import QuerySet
from django.utils.functional import cached_property


class EstimatedCountPaginator(Paginator):
    """Count exactly up to ``exact_count_limit`` rows; estimate or cap beyond it.

    ``count_is_exact`` says afterwards which it was; ``count_is_capped`` that the count stopped at
    the limit (there are more rows than that). Templates use them to say "about" or "more than".
    """

    #: Up to this many rows an exact count is cheap enough.
    exact_count_limit = 10_000

    def __init__(self, object_list: Any, per_page: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(object_list, per_page, *args, **kwargs)
        self.count_is_exact = True
        self.count_is_capped = False

    @cached_property
    def count(self) -> int:
        """The number of rows: exact when small, else an estimate or the limit."""
        queryset = self.object_list
        if not isinstance(queryset, QuerySet):
            return len(queryset)
        estimate = self._planner_estimate(queryset)
        if estimate is not None and estimate > self.exact_count_limit:
            self.count_is_exact = False
            return estimate
        bounded = queryset.order_by()[: self.exact_count_limit + 1].count()
        if bounded > self.exact_count_limit:
            self.count_is_exact = False
            self.count_is_capped = True
            return self.exact_count_limit
        return bounded

    @staticmethod
    def _planner_estimate(queryset: QuerySet) -> int | None:
        """PostgreSQL's estimate of the table's rows, for an unfiltered queryset only.

        None elsewhere, for a filtered queryset, and for a table never analysed (``reltuples``
        is -1 then, on PostgreSQL 14 and later; 0 before).
        """
        connection = connections[queryset.db]
        if connection.vendor != "postgresql" or queryset.query.where or queryset.query.is_sliced:
            return None
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT reltuples FROM pg_class WHERE oid = to_regclass(%s)",
                [connection.ops.quote_name(queryset.model._meta.db_table)],
            )
            row = cursor.fetchone()
        if row is None or row[0] is None or row[0] <= 0:
            return None
        return int(row[0])
