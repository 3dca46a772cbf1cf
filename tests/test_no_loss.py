"""Round 3 of 'nothing the user has is lost, no traceback', one test per class: a destructive option never acts
before the work can start, every output of a run counts as the run, names read from a file stay inside out_dir,
and damaged or doubled input is named instead of trained on."""

import json
import os
import shutil

from conftest import FIXTURE, RUN, cli_args, main, one_line_error


def snapshot(d):
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d)) if n[0] != "." and (d / n).is_file()}


def test_destructive_options_act_only_once_the_new_run_can_start(run_copy, tmp_path, capsys):
    d = run_copy
    before = snapshot(d)
    one_line_error(
        capsys,
        cli_args(d, **RUN, init_from="scratch", overwrite="true", data_files=str(tmp_path / "typo*.parquet")),
        "no file matches",
    )
    assert snapshot(d) == before
    os.remove(d / "ckpt.pt")  # to save disk: the rest of the run is still the run
    before = snapshot(d)
    one_line_error(capsys, cli_args(d, **RUN, seed=5), "no ckpt.pt")
    assert snapshot(d) == before
    one_line_error(capsys, cli_args(d, **RUN, max_docs=30, prepare_only="true"), "other data")  # other data
    assert snapshot(d) == before


def test_names_in_out_dir_files_never_leave_out_dir(run_copy, tmp_path, capsys):
    d, victim = run_copy, tmp_path / "victim.bin"
    m = json.loads((d / "manifest.json").read_text())
    shutil.move(d / m["splits"]["train"][0]["file"], victim)
    m["splits"]["train"][0]["file"] = "../victim.bin"
    (d / "manifest.json").write_text(json.dumps(m))
    for extra in ({}, {"max_docs": 30, "prepare_only": "true"}):
        one_line_error(capsys, cli_args(d, **{**RUN, **extra}), "not a shard file")
        assert victim.exists()


def test_doubled_or_damaged_input_is_named_not_trained_on(trained, run_copy, tmp_path, capsys):
    d = tmp_path / "twice"
    main.main(cli_args(d, prepare_only="true", data_files=f"{FIXTURE},{os.path.dirname(FIXTURE)}/wiki*.parquet"))
    assert (
        json.loads((d / "manifest.json").read_text())["num_docs"]
        == json.loads((trained.out / "manifest.json").read_text())["num_docs"]
    )
    for s in json.loads((run_copy / "manifest.json").read_text())["splits"]["train"]:
        (run_copy / s["file"]).write_bytes(os.urandom((run_copy / s["file"]).stat().st_size))
    err = one_line_error(capsys, cli_args(run_copy, **{**RUN, "steps": 16}), "does not match the sha256")
    assert "lower lr" not in err
