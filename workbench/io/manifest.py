"""Slide manifests: CSV or Parquet, validated with pandera, every bad row reported at once.

Columns: ``slide_id`` and ``path`` are required; ``patient_id``, ``site``, ``diagnosis`` (text) and
``mpp`` (level-0 µm/px, > 0, overrides the file) are optional. Relative paths are taken relative to the
manifest's folder. Slide ids name the slide's group in the store, so they use letters, digits, ``.``,
``_`` and ``-`` only and are unique. With ``check_files`` each path must be an existing, non-empty file.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa

REQUIRED = ("slide_id", "path")
OPTIONAL_TEXT = ("patient_id", "site", "diagnosis")
SLIDE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\-]*$"
from workbench.errors import ManifestError  # noqa: F401  (raised here; defined in workbench.errors)




def _schema() -> pa.DataFrameSchema:
    text = pa.Column(str, nullable=True, required=False, coerce=True)
    return pa.DataFrameSchema(
        {
            "slide_id": pa.Column(
                str,
                checks=[pa.Check.str_matches(SLIDE_ID_PATTERN), pa.Check.str_length(1, 200)],
                unique=True,
                nullable=False,
            ),
            "path": pa.Column(str, checks=pa.Check.str_length(min_value=1), nullable=False),
            "mpp": pa.Column(float, checks=pa.Check.in_range(0.05, 100.0), nullable=True, required=False, coerce=True),
            **{c: text for c in OPTIONAL_TEXT},
        },
        strict=False,
    )


def _read_table(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise ManifestError(f"manifest {path} does not exist")
    if not path.is_file():
        raise ManifestError(f"manifest {path} is a directory, not a CSV or Parquet file")
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            return pd.read_parquet(path)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise ManifestError(f"manifest {path} is not a readable Parquet file: {exc}") from None
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(
            f"manifest {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8"
        ) from None
    except pd.errors.EmptyDataError:
        raise ManifestError(f"manifest {path} is empty: it needs a header with at least slide_id,path") from None
    except pd.errors.ParserError as exc:
        raise ManifestError(f"manifest {path} is not a readable CSV: {exc}") from None


def validate_manifest(df: pd.DataFrame, *, base_dir: str | os.PathLike | None = None, check_files: bool = True,
                      source: str = "manifest") -> pd.DataFrame:
    """Validate a manifest table; returns a clean copy with absolute paths and float mpp.

    Raises :class:`ManifestError` listing every problem (row, slide_id, column, what is wrong).
    """
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ManifestError(f"{source} lacks required column(s) {missing}; it has {list(df.columns)}")
    df = df.copy()
    df["slide_id"] = df["slide_id"].astype("string").str.strip()
    problems: list[tuple] = []
    if "mpp" in df.columns:
        raw = df["mpp"]
        num = pd.to_numeric(raw, errors="coerce")
        for i in np.flatnonzero(raw.notna().to_numpy() & num.isna().to_numpy()):
            problems.append((i, df["slide_id"].iloc[i], "mpp", f"not a number: {raw.iloc[i]!r}"))
        df["mpp"] = num
    try:
        df = _schema().validate(df, lazy=True)
    except pa.errors.SchemaErrors as exc:
        for _, row in exc.failure_cases.iterrows():
            idx = row.get("index")
            i = int(idx) if idx is not None and not pd.isna(idx) else None
            sid = df["slide_id"].iloc[i] if i is not None and i < len(df) else None
            problems.append((i, sid, row.get("column"), f"{row.get('check')} (value {row.get('failure_case')!r})"))
    base = (Path(base_dir) if base_dir is not None else Path.cwd()).absolute()  # stores record absolute paths
    paths = []
    for i, p in enumerate(df["path"].astype("string")):
        full = Path(p) if pd.notna(p) else None
        if full is not None and not full.is_absolute():
            full = base / full
        paths.append(str(full) if full is not None else None)
        if check_files and full is not None:
            if not full.exists():
                problems.append((i, df["slide_id"].iloc[i], "path", f"file does not exist: {full}"))
            elif full.is_dir():
                problems.append((i, df["slide_id"].iloc[i], "path", f"is a directory, not a slide file: {full}"))
            elif full.stat().st_size == 0:
                problems.append((i, df["slide_id"].iloc[i], "path", f"file is empty: {full}"))
    if problems:
        lines = [f"  row {r if r is not None else '?'} (slide_id {s!r}) {c}: {m}" for r, s, c, m in problems]
        raise ManifestError(f"{source} has {len(problems)} problem(s):\n" + "\n".join(lines))
    df["path"] = paths
    for col in OPTIONAL_TEXT:
        if col not in df.columns:
            df[col] = None
    if "mpp" not in df.columns:
        df["mpp"] = np.nan
    return df.reset_index(drop=True)


def read_manifest(path: str | os.PathLike, *, check_files: bool = True) -> pd.DataFrame:
    """Read and validate a CSV or Parquet manifest (paths relative to the manifest's folder)."""
    path = Path(path)
    return validate_manifest(_read_table(path), base_dir=path.parent, check_files=check_files, source=f"manifest {path}")


def to_records(df: pd.DataFrame) -> list[dict]:
    """JSON-safe records (NaN → None) for the store's attributes."""
    cols = ["slide_id", "path", "patient_id", "site", "diagnosis", "mpp"]
    out = []
    for rec in df[cols].to_dict("records"):
        out.append({k: (None if (v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA) else v)
                    for k, v in rec.items()})
    return out
