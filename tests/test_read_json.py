"""files.read_json: the one reader of the package's JSON inputs, failing with one line naming the file."""

from __future__ import annotations

import pytest

from m2snet.data.format import load_dataset
from m2snet.data.split import load_split
from m2snet.errors import M2SNetError
from m2snet.files import read_json
from m2snet.workflows.paper import comparison_from_results


def test_read_json_reads_or_names_the_file(tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text('{"a": [1, 2]}')
    bad.write_text('{"a": ')
    assert read_json(good, "thing") == {"a": [1, 2]}
    with pytest.raises(M2SNetError, match=r"missing\.json: thing not found$"):
        read_json(tmp_path / "missing.json", "thing")
    with pytest.raises(M2SNetError, match=r"bad\.json: invalid JSON in the thing \(") as err:
        read_json(bad, "thing")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("reader, name, what", [
    (load_split, "split.json", "split file"),
    (lambda p: load_dataset(p.parent), "dataset.json", "dataset description"),
    (lambda p: comparison_from_results("busi", p), "cv_summary.json", "results file"),
])
def test_the_readers_of_json_inputs_share_it(tmp_path, reader, name, what):
    path = tmp_path / name
    path.write_text("{not json")
    with pytest.raises(M2SNetError, match=f"{path}: invalid JSON in the {what}"):
        reader(path)
