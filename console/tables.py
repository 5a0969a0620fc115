"""Filling a Textual DataTable from ``views`` columns and rows without losing
the operator's place: values are updated in place while the rows stay the
same, and the highlighted row follows its key when they change."""

from rich.text import Text
from textual.coordinate import Coordinate


def column_labels(columns, sorted_by, descending):
    labels = []
    for column in columns:
        label = column.label
        if column.key == sorted_by:
            label += " ▼" if descending else " ▲"
        labels.append((column.key, Text(label, justify="right" if column.numeric else "left")))
    return labels


def highlighted_key(table):
    if table.row_count == 0:
        return None
    row = min(table.cursor_row, table.row_count - 1)
    return table.coordinate_to_cell_key(Coordinate(row, 0)).row_key.value


def fill_table(table, columns, rows, row_key, sorted_by=None, descending=False):
    labels = column_labels(columns, sorted_by, descending)
    keys = [row_key(row) for row in rows]
    shown_labels = [(key.value, column.label) for key, column in table.columns.items()]
    shown_keys = [row.key.value for row in table.ordered_rows]
    if shown_labels == labels and shown_keys == keys:
        for key, row in zip(keys, rows):
            for column in columns:
                table.update_cell(key, column.key, column.render(row), update_width=True)
        return

    # New rows or a new order: rebuild, columns too, so their widths fit what
    # is shown now rather than the widest value ever shown.
    selected = highlighted_key(table)
    table.clear(columns=True)
    for key, label in labels:
        table.add_column(label, key=key)
    for key, row in zip(keys, rows):
        table.add_row(*(column.render(row) for column in columns), key=key)
    if selected in keys:
        table.move_cursor(row=keys.index(selected), animate=False)
