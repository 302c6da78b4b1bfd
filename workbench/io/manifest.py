"""Slide manifests: CSV or Parquet, validated with pandera, every bad row reported at once.

Columns: ``slide_id`` and ``path`` are required; ``patient_id``, ``site``, ``diagnosis`` (text) and
``mpp`` (level-0 µm/px, > 0, overrides the file) are optional. Relative paths are taken relative to the
manifest's folder. Slide ids name the slide's group in the store, so they use letters, digits, ``.``,
``_`` and ``-`` only and are unique. With ``check_files`` each path must be an existing, non-empty file.

Slide ids are checked one by one with a reason (:func:`slide_id_problem`): names Zarr reserves
(``zarr.json``, ``.zattrs``, ``__*``, ...), path separators, ``..``, control characters, non-ASCII text
(its Unicode normalisation may clash with another id) and ids equal but for letter case (they clash on
case-insensitive filesystems).

**Duplicate files.** With ``check_files``, each file gets a cheap fingerprint (size + the first and last
16 KiB, where TIFF headers and directories live; hard links and the same path share it) in the
``file_key`` column. The same file under two slide ids of *different* patients is a
:class:`ManifestError` (it would defeat leave-one-patient-out: the query's own file would sit in the
database under another patient) unless ``allow_duplicates=True``; otherwise duplicates are logged and
listed in ``duplicate_of``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pandera.pandas as pa

from workbench.errors import ManifestError

REQUIRED = ("slide_id", "path")
OPTIONAL_TEXT = ("patient_id", "site", "diagnosis")
SLIDE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\-]*$"

log = logging.getLogger(__name__)
ZARR_RESERVED = {"zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata"}
FINGERPRINT_BYTES = 16384


def slide_id_problem(sid) -> str | None:
    """Why ``sid`` cannot name a slide's group in the store, or None if it can."""
    if not isinstance(sid, str) or not sid:
        return "is empty"
    if any(unicodedata.category(ch).startswith("C") for ch in sid):
        return "contains a control or invisible character"
    if "/" in sid or "\\" in sid:
        return "contains a path separator ('/' or '\\')"
    if ".." in sid:
        return "contains '..'"
    if sid.lower() in ZARR_RESERVED or sid.startswith("__"):
        return "is a name Zarr reserves (zarr.json, .zarray, .zgroup, .zattrs, .zmetadata, __*)"
    if not sid.isascii():
        norm = unicodedata.normalize("NFKC", sid)
        return (
            f"has non-ASCII characters (Unicode normalises it to {norm!r}, which can clash with another "
            "id on some filesystems); use letters, digits, '.', '_' and '-'"
        )
    if len(sid) > 200:
        return "is longer than 200 characters"
    return None


def file_fingerprint(path: str | os.PathLike) -> str:
    """Cheap identity of a file: size + SHA-1 of its first and last 16 KiB (TIFF header and directories)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(FINGERPRINT_BYTES)
        if size > 2 * FINGERPRINT_BYTES:
            fh.seek(size - FINGERPRINT_BYTES)
        tail = fh.read(FINGERPRINT_BYTES)
    return f"{size}-{hashlib.sha1(head + tail).hexdigest()[:16]}"


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


def validate_manifest(
    df: pd.DataFrame,
    *,
    base_dir: str | os.PathLike | None = None,
    check_files: bool = True,
    source: str = "manifest",
    allow_duplicates: bool = False,
) -> pd.DataFrame:
    """Validate a manifest table; returns a clean copy with absolute paths and float mpp.

    Raises :class:`ManifestError` listing every problem (row, slide_id, column, what is wrong).
    """
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ManifestError(f"{source} lacks required column(s) {missing}; it has {list(df.columns)}")
    df = df.copy()
    df["slide_id"] = df["slide_id"].astype("string").str.strip()
    problems: list[tuple] = []
    seen_fold: dict = {}
    for i, sid in enumerate(df["slide_id"]):
        why = slide_id_problem(None if pd.isna(sid) else str(sid))
        if why:
            problems.append((i, sid, "slide_id", f"slide id {why}"))
            continue
        fold = unicodedata.normalize("NFKC", str(sid)).casefold()
        if fold in seen_fold and df["slide_id"].iloc[seen_fold[fold]] != sid:
            problems.append(
                (
                    i,
                    sid,
                    "slide_id",
                    f"differs from slide id {df['slide_id'].iloc[seen_fold[fold]]!r} "
                    "(row {}) only by letter case or Unicode form: they clash on case-insensitive "
                    "filesystems".format(seen_fold[fold]),
                )
            )
        seen_fold.setdefault(fold, i)
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
    paths, keys = [], {}
    for i, p in enumerate(df["path"].astype("string")):
        full = Path(p) if pd.notna(p) else None
        if full is not None and not full.is_absolute():
            full = base / full
        paths.append(str(full) if full is not None else None)
        if check_files and full is not None:
            try:
                exists = full.exists()
            except (OSError, ValueError) as exc:  # a NUL byte, a name too long, an unreachable mount
                problems.append((i, df["slide_id"].iloc[i], "path", f"unusable path {str(full)[:200]!r}: {exc}"))
                continue
            if not exists:
                problems.append((i, df["slide_id"].iloc[i], "path", f"file does not exist: {full}"))
            elif full.is_dir():
                problems.append((i, df["slide_id"].iloc[i], "path", f"is a directory, not a slide file: {full}"))
            elif not full.is_file():
                problems.append(
                    (i, df["slide_id"].iloc[i], "path", f"is not a regular file (a device, pipe or socket): {full}")
                )
            elif full.stat().st_size == 0:
                problems.append((i, df["slide_id"].iloc[i], "path", f"file is empty: {full}"))
            else:
                try:
                    keys[i] = file_fingerprint(full)
                except PermissionError:
                    problems.append((i, df["slide_id"].iloc[i], "path", f"permission denied reading {full}"))
                except OSError as exc:
                    problems.append((i, df["slide_id"].iloc[i], "path", f"cannot read {full}: {exc}"))
    dup_of = _duplicates(df, keys, problems, allow_duplicates)
    if problems:
        lines = [f"  row {r if r is not None else '?'} (slide_id {s!r}) {c}: {m}" for r, s, c, m in problems]
        raise ManifestError(f"{source} has {len(problems)} problem(s):\n" + "\n".join(lines))
    df["path"] = paths
    df["file_key"] = [keys.get(i) for i in range(len(df))]
    df["duplicate_of"] = [dup_of.get(i) for i in range(len(df))]
    for col in OPTIONAL_TEXT:
        if col not in df.columns:
            df[col] = None
    if "mpp" not in df.columns:
        df["mpp"] = np.nan
    return df.reset_index(drop=True)


def _duplicates(df: pd.DataFrame, keys: dict, problems: list, allow: bool) -> dict:
    """{row: slide id of the first row with the same file}; different patients → a problem unless ``allow``."""
    first: dict = {}
    out = {}
    pids = df["patient_id"] if "patient_id" in df.columns else pd.Series([None] * len(df))
    for i in sorted(keys):
        k = keys[i]
        if k not in first:
            first[k] = i
            continue
        j = first[k]
        a, b = pids.iloc[j], pids.iloc[i]
        out[i] = str(df["slide_id"].iloc[j])
        both = not (pd.isna(a) or pd.isna(b) or str(a) == "" or str(b) == "")
        if both and str(a) != str(b) and not allow:
            problems.append(
                (
                    i,
                    df["slide_id"].iloc[i],
                    "path",
                    f"is the same file as slide {df['slide_id'].iloc[j]!r} (row {j}) under another "
                    f"patient ({b!r} vs {a!r}): leave-one-patient-out would find the query in its own "
                    "database; fix the manifest or pass allow_duplicates=True",
                )
            )
        else:
            log.warning("slide %r is the same file as slide %r", df["slide_id"].iloc[i], df["slide_id"].iloc[j])
    return out


def duplicate_files(records: list[dict]) -> list[tuple[str, str]]:
    """Pairs (slide_id, slide_id) of manifest records that point at the same file (same ``file_key`` or path)."""
    seen, pairs = {}, []
    for r in records:
        for key in {("k", r.get("file_key")), ("p", os.path.realpath(r["path"]) if r.get("path") else None)}:
            if key[1] is None:
                continue
            if key in seen and seen[key] != r["slide_id"]:
                pairs.append((seen[key], r["slide_id"]))
                break
            seen.setdefault(key, r["slide_id"])
    return pairs


def read_manifest(path: str | os.PathLike, *, check_files: bool = True, allow_duplicates: bool = False) -> pd.DataFrame:
    """Read and validate a CSV or Parquet manifest (paths relative to the manifest's folder)."""
    path = Path(path)
    return validate_manifest(
        _read_table(path),
        base_dir=path.parent,
        check_files=check_files,
        source=f"manifest {path}",
        allow_duplicates=allow_duplicates,
    )


def to_records(df: pd.DataFrame) -> list[dict]:
    """JSON-safe records (NaN → None) for the store's attributes."""
    cols = ["slide_id", "path", "patient_id", "site", "diagnosis", "mpp"]
    cols += [c for c in ("file_key",) if c in df.columns and df[c].notna().any()]
    out = []
    for rec in df[cols].to_dict("records"):
        out.append(
            {
                k: (None if (v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA) else v)
                for k, v in rec.items()
            }
        )
    return out
