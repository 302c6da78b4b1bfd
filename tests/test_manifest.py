import pandas as pd
import pytest

from workbench.io.manifest import ManifestError, read_manifest, validate_manifest


def _write(tmp_path, text, name="m.csv", encoding="utf-8"):
    p = tmp_path / name
    p.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return p


def test_relative_paths_and_optional_columns(tmp_path):
    (tmp_path / "a.svs").write_bytes(b"x")
    df = read_manifest(_write(tmp_path, "slide_id,path,mpp\na,a.svs,0.25\n"))
    assert df.path[0] == str(tmp_path / "a.svs") and df.mpp[0] == 0.25
    assert set(["patient_id", "site", "diagnosis"]) <= set(df.columns)


def test_every_bad_row_listed(tmp_path):
    (tmp_path / "ok.svs").write_bytes(b"x")
    (tmp_path / "empty.svs").write_bytes(b"")
    (tmp_path / "dir.svs").mkdir()
    text = (
        "slide_id,path,mpp\n"
        "ok,ok.svs,0.25\n"
        "dup,ok.svs,\n"
        "dup,ok.svs,\n"
        "gone,missing.svs,\n"
        "folder,dir.svs,\n"
        "zero,ok.svs,0\n"
        "neg,ok.svs,-1\n"
        "txt,ok.svs,abc\n"
        "bad/id,ok.svs,\n"
        "hollow,empty.svs,\n"
    )
    with pytest.raises(ManifestError) as info:
        read_manifest(_write(tmp_path, text))
    msg = str(info.value)
    for needle in ["'dup'", "missing.svs", "directory", "'zero'", "'neg'", "not a number: 'abc'", "bad/id", "empty"]:
        assert needle in msg, (needle, msg)


def test_missing_columns_and_encoding(tmp_path):
    with pytest.raises(ManifestError, match=r"lacks required column\(s\) \['path'\]"):
        read_manifest(_write(tmp_path, "slide_id,file\na,b\n"))
    with pytest.raises(ManifestError, match="not UTF-8"):
        read_manifest(_write(tmp_path, "slide_id,path\nsl\xeff,a\n", encoding="latin-1"))
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "none.csv")


def test_parquet(tmp_path):
    (tmp_path / "a.svs").write_bytes(b"x")
    pd.DataFrame({"slide_id": ["a"], "path": ["a.svs"], "diagnosis": ["luad"]}).to_parquet(tmp_path / "m.parquet")
    df = read_manifest(tmp_path / "m.parquet")
    assert df.diagnosis[0] == "luad"


def test_dataframe_without_file_check():
    df = validate_manifest(pd.DataFrame({"slide_id": ["a"], "path": ["/nowhere/a.svs"]}), check_files=False)
    assert df.path[0] == "/nowhere/a.svs"
