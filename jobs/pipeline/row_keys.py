"""What identifies an output row: its ``custom_id``, and the source rows a committed chunk holds.

A source row is committed under its id, except a row whose id repeated an earlier row of the same
shard: that one is an error row ("duplicate id, first seen at source row N") and is committed under
its position in the source (its ``custom_id`` ends with ``-duplicate-row<row_index>``, which no
``<id>-<sample_index>`` can end with, so custom_ids stay unique).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

DUPLICATE_SUFFIX = "-duplicate-row"
_DUPLICATE_PATTERN = DUPLICATE_SUFFIX + r"\d+$"


def custom_id(row_id: str, sample_index: int, duplicate_row: int | None = None) -> str:
    """The stable id of one output row: ``<id>-<sample_index>``, plus the suffix for a repeated id's row."""
    base = f"{row_id}-{sample_index}"
    return base if duplicate_row is None else f"{base}{DUPLICATE_SUFFIX}{duplicate_row}"


def duplicate_error(first_row: int) -> str:
    """The error of a row whose id an earlier source row of the shard already has."""
    return f"duplicate id, first seen at source row {first_row}"


@dataclass
class CommittedRows:
    """The source rows committed in a run directory: by id, and repeated-id rows by source position."""

    ids: set[str] = field(default_factory=set)
    duplicate_rows: set[int] = field(default_factory=set)
    last_row: int = -1  # the largest row_index committed (-1: none)

    @staticmethod
    def of(table: pa.Table) -> CommittedRows:
        """The source rows ``table`` (a chunk) holds."""
        dup = pc.fill_null(pc.match_substring_regex(table.column("custom_id"), _DUPLICATE_PATTERN), False)
        last = pc.max(table.column("row_index")).as_py()
        return CommittedRows(
            set(table.column("id").filter(pc.invert(dup)).to_pylist()),
            set(table.column("row_index").filter(dup).to_pylist()),
            -1 if last is None else last,
        )

    def __len__(self) -> int:
        return len(self.ids) + len(self.duplicate_rows)

    def overlaps(self, other: CommittedRows) -> bool:
        """Whether a source row is in both."""
        return not (self.ids.isdisjoint(other.ids) and self.duplicate_rows.isdisjoint(other.duplicate_rows))

    def update(self, other: CommittedRows) -> None:
        """Add ``other``'s rows."""
        self.ids |= other.ids
        self.duplicate_rows |= other.duplicate_rows
        self.last_row = max(self.last_row, other.last_row)
