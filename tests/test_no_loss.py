"""Round 3 of 'nothing the user has is lost, no traceback', one test per class: a destructive option never acts
before the work can start, every output of a run counts as the run, names read from a file stay inside out_dir,
and damaged or doubled input is named instead of trained on."""
import json
import os
import shutil

import pytest

from conftest import FIXTURE, cli_args, run_main

RUN = dict(steps=8, eval_every=4, export_hf="false")


def one_line_error(p, *words):
    err = p.stderr.strip()
    return p.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1 and all(w in err for w in words)


def snapshot(d):
    return {n: (d / n).read_bytes() for n in sorted(os.listdir(d)) if n[0] != "." and (d / n).is_file()}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert run_main(cli_args(out, **RUN)).returncode == 0
    return out


def copy(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock", ".prepare.lock"))
    return dst


def test_destructive_options_act_only_once_the_new_run_can_start(run_dir, tmp_path):
    d = copy(run_dir, tmp_path / "a")
    before = snapshot(d)
    p = run_main(cli_args(d, **RUN, init_from="scratch", overwrite="true", data_files=str(tmp_path / "typo*.parquet")))
    assert one_line_error(p, "no file matches") and snapshot(d) == before
    os.remove(d / "ckpt.pt")  # to save disk: the rest of the run is still the run
    before = snapshot(d)
    p = run_main(cli_args(d, **RUN, seed=5))
    assert one_line_error(p, "no ckpt.pt") and snapshot(d) == before
    p = run_main(cli_args(d, **RUN, max_docs=30, prepare_only="true"))  # other data over a run's shards
    assert one_line_error(p, "other data") and snapshot(d) == before


def test_names_in_out_dir_files_never_leave_out_dir(run_dir, tmp_path):
    d, victim = copy(run_dir, tmp_path / "b"), tmp_path / "victim.bin"
    m = json.loads((d / "manifest.json").read_text())
    shutil.move(d / m["splits"]["train"][0]["file"], victim)
    m["splits"]["train"][0]["file"] = "../victim.bin"
    (d / "manifest.json").write_text(json.dumps(m))
    for extra in ({}, {"max_docs": 30, "prepare_only": "true"}):
        assert one_line_error(run_main(cli_args(d, **{**RUN, **extra})), "not a shard file") and victim.exists()


def test_doubled_or_damaged_input_is_named_not_trained_on(run_dir, tmp_path):
    d = tmp_path / "twice"
    p = run_main(cli_args(d, prepare_only="true", data_files=f"{FIXTURE},{os.path.dirname(FIXTURE)}/wiki*.parquet"))
    assert p.returncode == 0
    assert json.loads((d / "manifest.json").read_text())["num_docs"] == \
        json.loads((run_dir / "manifest.json").read_text())["num_docs"]
    d = copy(run_dir, tmp_path / "rnd")
    for s in json.loads((d / "manifest.json").read_text())["splits"]["train"]:
        (d / s["file"]).write_bytes(os.urandom((d / s["file"]).stat().st_size))
    p = run_main(cli_args(d, **{**RUN, "steps": 12}))
    assert one_line_error(p, "does not match the sha256") and "lower lr" not in p.stderr
