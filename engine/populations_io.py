"""Reading and writing device populations as Parquet or CSV files.

A population file has one row per device and these columns (others are ignored):

- ``device_id``: whole numbers from 0 to 2^64 - 1 (stored as uint64);
- ``lat``, ``lng``: degrees, latitude within [-90, 90] and longitude within
  [-180, 180], finite (stored as float64; integer columns are accepted);
- ``gateway`` (optional): the partner app, 0 to 65535 (stored as uint16). A file
  without it puts every device on gateway 0, the engine's default gateway for
  ``LocationIndex.upsert``.

A device is its ``(gateway, device_id)`` pair, as in the engine: two rows with the same
pair are an error, two gateways may use the same id.

Every problem raises :class:`PopulationError` with a one-line message naming the file,
the column and the first bad row. Rows are counted from 1 in file order, not counting
a CSV's header line, so row ``k`` of a CSV file is on line ``k + 1``.

Parquet is chosen by the suffix ``.parquet`` or ``.pq``, CSV by ``.csv`` (also
``.csv.gz`` and the other compressions pyarrow detects); any other name is read as
Parquet if it starts with Parquet's magic bytes, else as CSV.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

#: Columns every population file must have.
REQUIRED = ("device_id", "lat", "lng")
#: Gateway of every device when a file has no ``gateway`` column.
DEFAULT_GATEWAY = 0

_TYPES = {
    "device_id": pa.uint64(),
    "lat": pa.float64(),
    "lng": pa.float64(),
    "gateway": pa.uint16(),
}
_NUMPY_TYPES = {"device_id": np.uint64, "lat": np.float64, "lng": np.float64, "gateway": np.uint16}
# Values of string columns are converted a slice at a time, so that the first bad row
# is found without a Python loop over a whole column of good values.
_SLICE_ROWS = 65_536


class PopulationError(ValueError):
    """A population file that cannot be used; the message names the file, the column
    and the first bad row."""


@dataclass(frozen=True)
class Population:
    """A population read from a file: equal-length columns plus where they came from.

    ``gateway_given`` is False when the file had no ``gateway`` column and every device
    was put on :data:`DEFAULT_GATEWAY`.
    """

    device_id: np.ndarray
    lat: np.ndarray
    lng: np.ndarray
    gateway: np.ndarray
    path: str = ""
    format: str = ""
    gateway_given: bool = True

    def __len__(self) -> int:
        return int(self.device_id.size)

    def columns(self) -> dict[str, np.ndarray]:
        """The columns as a dict, like :func:`engine.population.metro` returns."""
        return {
            "device_id": self.device_id,
            "lat": self.lat,
            "lng": self.lng,
            "gateway": self.gateway,
        }


def file_format(path: str | Path) -> str:
    """``"parquet"`` or ``"csv"`` for a path, by its suffix or its first bytes."""
    name = str(path).lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if ".csv" in Path(name).name:
        return "csv"
    try:
        with open(path, "rb") as handle:
            return "parquet" if handle.read(4) == b"PAR1" else "csv"
    except OSError:
        return "csv"


def read(path: str | Path) -> Population:
    """Reads and checks a population file (Parquet or CSV, see the module docstring).

    Raises:
        PopulationError: naming the file, the column and the first bad row.
    """
    where = str(path)
    kind = file_format(path)
    if not Path(path).is_file():
        raise PopulationError(f"{where}: no such file")
    table = _read_parquet(path, where) if kind == "parquet" else _read_csv(path, where)
    if table.num_rows == 0:
        raise PopulationError(f"{where}: no devices (the file has no rows)")

    gateway_given = "gateway" in table.column_names
    columns = {
        name: _column(table.column(name), name, where)
        for name in (*REQUIRED, "gateway")
        if name in table.column_names
    }
    if not gateway_given:
        columns["gateway"] = np.full(table.num_rows, DEFAULT_GATEWAY, dtype=np.uint16)
    check(columns, where)
    return Population(**columns, path=where, format=kind, gateway_given=gateway_given)


def write(path: str | Path, columns: dict[str, np.ndarray]) -> str:
    """Writes a population to ``path``: Parquet for ``.parquet``/``.pq``, CSV for
    ``.csv``. Returns the format written.

    Raises:
        PopulationError: for another suffix, or columns that :func:`check` refuses.
    """
    name = str(path).lower()
    if name.endswith((".parquet", ".pq")):
        kind = "parquet"
    elif name.endswith(".csv"):
        kind = "csv"
    else:
        raise PopulationError(f"{path}: the file name must end in .parquet or .csv")
    check(columns, str(path))
    table = pa.table(
        {name: pa.array(columns[name], type=_TYPES[name]) for name in (*REQUIRED, "gateway")}
    )
    try:
        if kind == "parquet":
            pq.write_table(table, path)
        else:
            pa_csv.write_csv(table, path)
    except OSError as error:
        raise PopulationError(f"{path}: cannot write: {error}") from None
    return kind


def check(columns: dict[str, np.ndarray], where: str = "population") -> None:
    """Checks converted columns: equal lengths, finite coordinates in range, no device
    twice. Raises :class:`PopulationError` naming the column and the first bad row."""
    n = columns["device_id"].size
    for name in ("lat", "lng", "gateway"):
        if columns[name].size != n:
            raise PopulationError(
                f"{where}: column {name} has {columns[name].size} values, device_id has {n}"
            )
    for name, limit in (("lat", 90.0), ("lng", 180.0)):
        values = columns[name]
        bad = np.flatnonzero(~(np.abs(values) <= limit))  # NaN compares false
        if bad.size:
            value = float(values[bad[0]])
            reason = (
                "is not a finite number"
                if not np.isfinite(value)
                else f"is outside [-{limit:g}, {limit:g}]"
            )
            raise PopulationError(
                f"{where}: column {name}, row {bad[0] + 1}: {value!r} {reason} "
                f"({bad.size:,} bad row(s) in all)"
            )
    _check_unique(columns["gateway"], columns["device_id"], where)


def _check_unique(gateway: np.ndarray, device_id: np.ndarray, where: str) -> None:
    """Raises naming the first row that repeats an earlier row's (gateway, device_id)."""
    # Fast path: sorted ids without neighbours alike cannot hold a repeated pair.
    ids = np.sort(device_id)
    shared = ids[1:][ids[1:] == ids[:-1]]
    if shared.size == 0:
        return
    rows = np.flatnonzero(np.isin(device_id, shared))
    order = np.lexsort((rows, device_id[rows], gateway[rows]))
    rows = rows[order]
    same = (gateway[rows[1:]] == gateway[rows[:-1]]) & (device_id[rows[1:]] == device_id[rows[:-1]])
    if not same.any():
        return
    # Within a run of equal pairs rows ascend, so each repeat follows its first row; the
    # earliest repeat in the file is the smallest repeating row.
    repeats = np.flatnonzero(same) + 1
    first = repeats[np.argmin(rows[repeats])]
    start = first
    while start > 0 and same[start - 1]:
        start -= 1
    row, earlier = rows[first], rows[start]
    raise PopulationError(
        f"{where}: row {row + 1} repeats the device of row {earlier + 1} "
        f"(gateway {gateway[row]}, device_id {device_id[row]}); "
        f"{int(same.sum()):,} repeated row(s) in all"
    )


def _read_parquet(path: str | Path, where: str) -> pa.Table:
    try:
        schema = pq.read_schema(path)
        _require(schema.names, where)
        wanted = [name for name in (*REQUIRED, "gateway") if name in schema.names]
        return pq.read_table(path, columns=wanted)
    except (pa.ArrowException, OSError) as error:
        raise PopulationError(
            f"{where}: not a readable Parquet file: {_first_line(error)}"
        ) from None


def _read_csv(path: str | Path, where: str) -> pa.Table:
    # Only the empty field is missing: "nan" must reach the NaN check and "NA" the
    # number check, both of which name the row.
    def attempt(types: dict[str, pa.DataType]) -> pa.Table:
        source = pa.input_stream(str(path), compression="detect")
        return pa_csv.read_csv(
            source,
            convert_options=pa_csv.ConvertOptions(
                column_types=types,
                null_values=[""],
                strings_can_be_null=True,
                include_columns=[*REQUIRED, "gateway"],
                include_missing_columns=True,
            ),
        )

    try:
        names = _csv_header(path)
    except (pa.ArrowException, OSError) as error:
        raise _csv_problem(path, where, error) from None
    _require(names, where)
    try:
        try:
            table = attempt(
                {
                    "device_id": pa.uint64(),
                    "lat": pa.float64(),
                    "lng": pa.float64(),
                    "gateway": pa.int64(),
                }
            )
        except pa.ArrowInvalid:
            # A value that does not convert: read the columns as text, and let the column
            # checks find and name the first bad row.
            table = attempt({name: pa.string() for name in _TYPES})
    except (pa.ArrowException, OSError) as error:
        raise _csv_problem(path, where, error) from None
    keep = [name for name in (*REQUIRED, "gateway") if name in names]
    return table.select(keep)


def _csv_problem(path: str | Path, where: str, error: BaseException) -> PopulationError:
    """The error for a CSV file that does not parse: naming the first row whose number
    of values differs from the header's when there is one, else Arrow's reason."""
    invalid: list = []

    def first(row) -> str:
        invalid.append(row)
        return "error"

    header: list[str] = []
    try:
        with pa.input_stream(str(path), compression="detect") as stream:
            start = stream.read(1 << 16)
        line = start.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8-sig", "replace")
        header = next(csv.reader([line]), [])
        # One thread, so that Arrow numbers the rows; every column as text, so that no
        # value stops the read before the first bad row, which does.
        with pa.input_stream(str(path), compression="detect") as source:
            reader = pa_csv.open_csv(
                source,
                read_options=pa_csv.ReadOptions(use_threads=False),
                parse_options=pa_csv.ParseOptions(invalid_row_handler=first),
                convert_options=pa_csv.ConvertOptions(
                    column_types=dict.fromkeys(header, pa.string()), null_values=[""]
                ),
            )
            for _ in reader:
                pass
    except (pa.ArrowException, OSError, csv.Error):
        pass
    if not invalid or invalid[0].number is None:
        return PopulationError(f"{where}: not a readable CSV file: {_first_line(error)}")
    row = invalid[0]
    # Arrow counts the header as record 1 and skips empty lines, like the rows here.
    message = (
        f"{where}: row {row.number - 1}: {row.actual_columns} values, the header has "
        f"{row.expected_columns}"
    )
    if row.actual_columns < row.expected_columns == len(header):
        missing = ", ".join(header[row.actual_columns :])
        message += f"; no value for {missing}"
    text = row.text if len(row.text) <= 120 else row.text[:120] + "..."
    return PopulationError(f"{message}: {text!r}")


def _csv_header(path: str | Path) -> list[str]:
    source = pa.input_stream(str(path), compression="detect")
    reader = pa_csv.open_csv(
        source, convert_options=pa_csv.ConvertOptions(column_types={}, null_values=[""])
    )
    return list(reader.schema.names)


def _require(names: list[str], where: str) -> None:
    missing = [name for name in REQUIRED if name not in names]
    if missing:
        present = ", ".join(names) if names else "none"
        raise PopulationError(
            f"{where}: missing column {', '.join(missing)} (columns present: {present}; "
            f"needed: {', '.join(REQUIRED)}, optionally gateway)"
        )


def _column(column: pa.ChunkedArray, name: str, where: str) -> np.ndarray:
    """One column as a numpy array of its target type, or an error naming the row."""
    whole = name != "lat" and name != "lng"
    kind = column.type
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column

    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise PopulationError(
            f"{where}: column {name}, row {row + 1}: empty ({column.null_count:,} empty "
            "value(s) in all)"
        )
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        column = _parse_text(column, name, where, whole)
        kind = column.type
    if whole and not pa.types.is_integer(kind):
        raise PopulationError(
            f"{where}: column {name}, row 1: {column[0].as_py()!r} is stored as {kind}; "
            f"{name} needs an integer type"
        )
    if not whole and not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
        raise PopulationError(
            f"{where}: column {name}, row 1: {column[0].as_py()!r} is stored as {kind}; "
            f"{name} needs numbers of degrees"
        )
    if not whole:
        return np.ascontiguousarray(column.cast(pa.float64()).to_numpy(), dtype=np.float64)

    values = column.to_numpy()
    high = 65535 if name == "gateway" else np.iinfo(np.uint64).max
    if values.dtype.kind == "i":
        bad = np.flatnonzero(values < 0)
        if bad.size:
            raise PopulationError(
                f"{where}: column {name}, row {bad[0] + 1}: {values[bad[0]]} is negative "
                f"({bad.size:,} bad row(s) in all)"
            )
    if high < np.iinfo(np.uint64).max:
        bad = np.flatnonzero(values.astype(np.uint64) > high)
        if bad.size:
            raise PopulationError(
                f"{where}: column {name}, row {bad[0] + 1}: {values[bad[0]]} is above "
                f"{high} ({bad.size:,} bad row(s) in all)"
            )
    return np.ascontiguousarray(values.astype(_NUMPY_TYPES[name]))


def _parse_text(column: pa.Array, name: str, where: str, whole: bool) -> pa.Array:
    """A text column converted to int64/uint64 (``whole``) or float64, slice by slice;
    the first value that does not convert is named with its row."""
    target = pa.uint64() if whole else pa.float64()
    parts = []
    for start in range(0, len(column), _SLICE_ROWS):
        piece = pc.utf8_trim_whitespace(column.slice(start, _SLICE_ROWS))
        try:
            parts.append(pc.cast(piece, target))
        except pa.ArrowInvalid:
            _name_bad_text(piece, start, name, where, whole)
    return pa.concat_arrays(parts)


def _name_bad_text(piece: pa.Array, start: int, name: str, where: str, whole: bool) -> None:
    for offset, value in enumerate(piece.to_pylist()):
        try:
            number = int(value) if whole else float(value)
        except ValueError:
            what = "a whole number" if whole else "a number"
            raise PopulationError(
                f"{where}: column {name}, row {start + offset + 1}: {value!r} is not {what}"
            ) from None
        if whole and number < 0:
            raise PopulationError(
                f"{where}: column {name}, row {start + offset + 1}: {number} is negative"
            )
    # Python reads a few spellings that Arrow does not (digit separators, for one).
    raise PopulationError(
        f"{where}: column {name}: a value in rows {start + 1} to {start + len(piece)} "
        "does not convert to a number"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
