"""The one schema of the files handed between users and steps: strict types before ranges, one line that names
the file and the field in the product's words."""

import pytest

from common.errors import DataError, NVAEError
from common.schema import DataManifest, EvalMetrics, check, read_json

GOOD = {"dataset": "mnist", "shape": [28, 28, 1], "bits": 8, "splits": {"test": {"file": "test.npy", "count": 3}}}


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({**GOOD, "shape": [28, 0, 1]}, "shape: expected [height, width, channels], three positive integers, got [28, 0, 1]"),
        ({**GOOD, "bits": 8.0}, "bits: expected an integer from 1 to 8, got 8.0"),
        ({k: v for k, v in GOOD.items() if k != "dataset"}, "dataset: missing (expected a name)"),
        ({**GOOD, "splits": {}}, "splits: expected a mapping of split names to entries, got dict"),
        ({**GOOD, "splits": {"test": {"file": "test.npy", "count": "3"}}}, 'splits.test.count: expected an integer >= 0, got "3"'),
        ("[]", 'manifest: expected a JSON object, got "[]"'),
    ],
)  # fmt: skip
def test_the_first_error_is_one_line_naming_the_field(data, says):
    with pytest.raises(DataError) as caught:
        check(DataManifest, data, "d/manifest.json", DataError)
    assert str(caught.value) == f"d/manifest.json: {says}"


def test_fields_it_does_not_name_are_kept_and_numbers_may_be_integers():
    metrics = check(EvalMetrics, {"num_images": 2, "iw_samples": 1, "nll_bpd": 3, "nelbo_bpd": 3.1,
                                  "kl_per_group": [1, 0.5], "seed": 4}, "m.json")  # fmt: skip
    assert metrics.nll_bpd == 3.0 and metrics.model_dump()["seed"] == 4


def test_reading_a_file_names_its_position_or_its_absence(tmp_path):
    bad = tmp_path / "m.json"
    bad.write_text('{"num_images": 2,\n  "nll_bpd": NaN,}')
    with pytest.raises(NVAEError, match=r"m.json:2:18: not valid JSON"):
        read_json(bad, EvalMetrics)
    bad.write_text('{"num_images": 2, "iw_samples": 1, "nll_bpd": NaN, "nelbo_bpd": 1, "kl_per_group": [1]}')
    with pytest.raises(NVAEError, match="nll_bpd: expected a finite number, got NaN"):
        read_json(bad, EvalMetrics)
    with pytest.raises(NVAEError, match="missing.json: no such metrics file"):
        read_json(tmp_path / "missing.json", EvalMetrics, what="metrics file")
