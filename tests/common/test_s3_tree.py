"""`nvae store put FOLDER s3://b/p/` and `nvae store get s3://b/p/ --out FOLDER`: the multi-node TrainJob's way
of moving the prepared data and node 0's run folder through the store."""

from __future__ import annotations

from cli.main import main


def test_a_folder_goes_up_and_comes_back_with_its_relative_paths(s3_env, tmp_path, capsys):
    s3_env["make_bucket"]("trees")
    src = tmp_path / "out"
    (src / "dvclive" / "plots").mkdir(parents=True)
    (src / "train_summary.json").write_text('{"steps": 3}')
    (src / "dvclive" / "plots" / "loss.tsv").write_text("step\tloss\n1\t2.0\n")
    assert main(["store", "put", str(src), "s3://trees/runs/r1/out/"]) == 0
    assert "(2 files)" in capsys.readouterr().out

    dest = tmp_path / "back"
    assert main(["store", "get", "s3://trees/runs/r1/out/", "--out", str(dest)]) == 0
    assert (dest / "train_summary.json").read_text() == '{"steps": 3}'
    assert (dest / "dvclive" / "plots" / "loss.tsv").read_text() == "step\tloss\n1\t2.0\n"
    assert not list(dest.rglob("*.part"))


def test_an_empty_prefix_is_one_line_naming_it(s3_env, tmp_path, capsys):
    s3_env["make_bucket"]("trees-empty")
    assert main(["store", "get", "s3://trees-empty/nothing/", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "s3://trees-empty/nothing/: no objects under this prefix" in err and "\n" not in err


def test_an_unreachable_store_exits_75(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    (tmp_path / "f").write_text("x")
    assert main(["store", "put", str(tmp_path), "s3://b/p/"]) == 75
