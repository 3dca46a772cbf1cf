"""Round 4, the input side: a benchmark never touches a run's files; --data_files that names nothing, directories,
commas; articles with no text; every input error names its file and tells damage from a read that passes; a
prepared out_dir needs no input; Ctrl-C while writing a checkpoint or while torch loads; no W&B run for a run that
never trained."""

import errno
import json
import os
import pathlib
import runpy
import shutil
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_tracking import fake_wandb

from conftest import FIXTURE, ROOT, TINY, cli_args, main, one_line_error, tiny_cfg

TRAIN = dict(steps=2, eval_every=2, export_hf="false")


def tree(d):
    """Every file under d, by relative path, with its bytes: what must stay byte-identical."""
    return {
        os.path.relpath(os.path.join(r, n), d): open(os.path.join(r, n), "rb").read()
        for r, _, names in os.walk(d)
        for n in names
    }


def manifest(d):
    return json.loads((d / "manifest.json").read_text())


def prepare(capsys, out_dir, *data_files, **kw):
    """main.py --prepare_only with each of data_files as its own --data_files; -> (manifest, what it printed)."""
    capsys.readouterr()
    argv = cli_args(out_dir, prepare_only="true", **kw)[1:] + [f"--data_files={f}" for f in data_files]
    main.main(argv)
    return manifest(out_dir), capsys.readouterr().out


def error_after_prepare(capsys, argv, *words):
    """one_line_error for a refusal that comes once the input is read: the prepare bar may stand above the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.splitlines()[-1].startswith("error: ") and "Traceback" not in err, err[-2000:]
    assert all(w in err.splitlines()[-1] for w in words), err
    return err.splitlines()[-1]


def texts_file(path, texts, **kw):
    pq.write_table(pa.table({"id": [str(i) for i in range(len(texts))], "text": texts}), path, **kw)
    return str(path)


def test_ckpt_write_benchmark_on_a_runs_out_dir_leaves_the_run_byte_identical(run_copy, capsys, monkeypatch):
    def ckpt_write(*args):  # `python benchmarks/ckpt_write.py ARGS`, in this process
        monkeypatch.setattr(sys, "argv", ["ckpt_write.py", *args, *shape])
        runpy.run_path(os.path.join(ROOT, "benchmarks", "ckpt_write.py"), run_name="__main__")
        return capsys.readouterr().out

    before = tree(run_copy)
    shape = [f"--{k}={TINY[k]}" for k in ("n_layer", "n_head", "n_embd", "seq_len")]
    assert "written" in ckpt_write(f"--out_dir={run_copy}")
    assert tree(run_copy) == before
    with pytest.raises(SystemExit) as e:  # sys.exit(message): exit status 1, the message as the one line on stderr
        ckpt_write(f"--out_dir={run_copy}/missing")
    assert str(e.value.code).startswith("error: ") and "\n" not in e.value.code and "not a directory" in e.value.code


@pytest.mark.parametrize("value", ["", ",", " , ,"])
def test_data_files_that_names_nothing_is_one_line_saying_it_is_empty_not_the_hub(tmp_path, capsys, value):
    err = one_line_error(capsys, cli_args(tmp_path / "o", data_files=value), "is empty")
    assert "hub" not in err.lower() and not (tmp_path / "o").exists()
    one_line_error(capsys, cli_args(tmp_path / "o", wandb_project=value), "wandb_project", "is empty")


def test_a_directory_repeated_or_escaped_commas_and_a_trailing_comma_name_the_files_meant(tmp_path, capsys):
    t = pq.read_table(FIXTURE)
    (tmp_path / "dump" / "sub").mkdir(parents=True)
    a, b = tmp_path / "dump" / "a.parquet", tmp_path / "dump" / "sub" / "b.parquet"
    pq.write_table(t.slice(0, 30), a)
    pq.write_table(t.slice(30), b)
    (tmp_path / "dump" / "notes.txt").write_text("not parquet")
    want = prepare(capsys, tmp_path / "files", f"{a},{b}")[0]["content_hash"]
    assert prepare(capsys, tmp_path / "dir", tmp_path / "dump")[0]["content_hash"] == want  # recursive, sorted
    comma = tmp_path / "wiki,comma [1].parquet"
    shutil.copy(b, comma)
    assert prepare(capsys, tmp_path / "rep", a, comma)[0]["content_hash"] == want
    escaped = str(comma).replace(",", "\\,")
    assert prepare(capsys, tmp_path / "esc", f"{a},{escaped},")[0]["content_hash"] == want
    one_line_error(capsys, cli_args(tmp_path / "o", data_files=tmp_path / "dump" / "sub" / "none"), "no file matches")
    (tmp_path / "empty_dir").mkdir()
    one_line_error(capsys, cli_args(tmp_path / "o", data_files=tmp_path / "empty_dir"), "no *.parquet")


def with_blanks(path, **kw):
    """The fixture with an article of no text (empty, whitespace, null) after every other one."""
    texts = pq.read_table(FIXTURE).column("text").to_pylist()
    mixed = [x for i, t in enumerate(texts) for x in ([t, ["", " \n\t ", None][i % 3]] if i % 2 else [t])]
    return texts_file(path, mixed, **kw), len(mixed) - len(texts)


def test_articles_with_no_text_are_left_out_and_counted_also_across_a_resume(tmp_path, capsys, monkeypatch):
    plain = prepare(capsys, tmp_path / "plain", FIXTURE, shard_tokens=5000)[0]
    mixed, blanks = with_blanks(tmp_path / "mixed.parquet", row_group_size=7)
    m, out = prepare(capsys, tmp_path / "mixed", mixed, shard_tokens=5000)
    assert m["content_hash"] == plain["content_hash"] and f"({blanks} with no text, left out)" in out
    real, calls = main.open_parquet, []

    def fails_once(path):  # the 9th read of a row group fails with an OS error, once: a read that passes
        calls.append(path)
        if len(calls) == 10:
            raise OSError(errno.EIO, "Input/output error")
        return real(path)

    monkeypatch.setattr(main, "open_parquet", fails_once)
    cfg = tiny_cfg(tmp_path / "broken", data_files=mixed, shard_tokens=5000)
    with pytest.raises(main.UserError, match=r"mixed.parquet \(row group \d+\) failed .*rerun continues") as e:
        main.prepare(cfg, log=print)
    assert "damaged" not in str(e.value)
    monkeypatch.setattr(main, "open_parquet", real)
    m, out = prepare(capsys, tmp_path / "broken", mixed, shard_tokens=5000)
    assert "resumed at article" in out and m["content_hash"] == plain["content_hash"]
    assert f"({blanks} with no text, left out)" in out


def test_input_with_no_text_is_refused_before_training(tmp_path, capsys):
    blank = texts_file(tmp_path / "blank.parquet", ["\n\n", "\t \t", " ", "\r\n", "", None] * 300)
    out = tmp_path / "o"
    error_after_prepare(capsys, cli_args(out, data_files=blank, **TRAIN), "no text", "1,800 articles")
    assert not out.exists()  # nothing of it is kept: no shards without a manifest, no empty out_dir


def test_one_article_is_refused_before_tokenizing_and_names_more_articles(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(main, "tokenize_task", lambda task: pytest.fail("tokenized"))
    one = texts_file(tmp_path / "one.parquet", ["a single long article " * 500])
    one_line_error(capsys, cli_args(tmp_path / "o", data_files=one), "only 1 article", "more articles")
    one_line_error(capsys, cli_args(tmp_path / "o", max_docs=1), "only 1 article", "more articles")


def bad_utf8(path):
    raw = [b"fine text " * 50, b"bad \xc3\x28 bytes " * 40]
    offsets = pa.py_buffer(np.array([0, len(raw[0]), len(raw[0]) + len(raw[1])], np.int32).tobytes())
    col = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"".join(raw))])
    pq.write_table(pa.table({"id": ["1", "2"], "text": col}), path)
    return str(path)


def corrupt_pages(path):
    """The fixture in row groups of 20 with 2,000 bytes in the middle overwritten: a valid footer, damaged pages."""
    pq.write_table(pq.read_table(FIXTURE), path, row_group_size=20)
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 2000] = np.random.default_rng(0).bytes(2000)
    path.write_bytes(bytes(data))
    return str(path)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_damaged_input_names_the_file_and_row_group_and_says_a_rerun_fails_the_same(tmp_path, capsys, num_proc):
    other = texts_file(tmp_path / "more.parquet", ["Plain text article number two. " * 30] * 10)
    utf8 = bad_utf8(tmp_path / "zz_broken_utf8.parquet")
    for data, where in (
        (f"{FIXTURE},{other},{utf8}", "zz_broken_utf8.parquet (row group 0)"),
        (corrupt_pages(tmp_path / "pages.parquet"), "pages.parquet (row group "),
    ):
        err = error_after_prepare(
            capsys, cli_args(tmp_path / "o", data_files=data, num_proc=num_proc, prepare_only="true"), where
        )
        assert "is damaged" in err and "fails the same way" in err and "leave it out" in err


def test_a_prepared_run_continues_with_its_input_moved_deleted_or_not_given(tmp_path, capsys):
    out, m1, m2 = tmp_path / "run", tmp_path / "m1" / "wiki.parquet", tmp_path / "m2" / "wiki.parquet"
    m1.parent.mkdir()
    m2.parent.mkdir()
    shutil.copy(FIXTURE, m1)
    main.main(cli_args(out, data_files=m1, **TRAIN))
    os.rename(m1, m2)
    main.main(cli_args(out, data_files=m2, **{**TRAIN, "steps": 4}))  # moved: the same data
    os.remove(m2)
    capsys.readouterr()
    main.main(cli_args(out, data_files=m2, **{**TRAIN, "steps": 6}))  # gone
    assert "not checked" in capsys.readouterr().out
    main.main(cli_args(out, **{**TRAIN, "steps": 8})[1:])  # not given: the shards, never the hub
    assert f"prepared from {m2}" in capsys.readouterr().out
    assert [r["step"] for r in main.read_jsonl(out / "metrics.jsonl") if r["kind"] == "eval"] == [0, 2, 4, 6, 8]
    texts_file(m2, ["Other data entirely, a different article. " * 40] * 20)  # other data there now: noticed
    one_line_error(capsys, cli_args(out, data_files=m2, **{**TRAIN, "steps": 10}), "other data")
    one_line_error(capsys, cli_args(out, **{**TRAIN, "steps": 10})[1:], "other data")


def test_a_second_ctrl_c_while_ckpt_pt_is_written_is_one_line_exit_130_and_keeps_the_old_one(
    tmp_path, capsys, monkeypatch
):
    real, calls = torch.save, []

    class Interrupting:  # the file torch.save writes to: the second Ctrl-C comes in mid-file, inside its 3rd write
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, b):
            self.writes += 1
            if self.writes == 3:  # torch then fails its own end-of-file check: a RuntimeError over KeyboardInterrupt
                os.kill(os.getpid(), signal.SIGINT)
            return self.f.write(b)

        def flush(self):
            return self.f.flush()

    def save(obj, f):
        calls.append(1)
        if len(calls) == 2:  # the checkpoint at the second eval; the first stays
            os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: stop at the end of this step
            f = Interrupting(f)
        return real(obj, f)

    monkeypatch.setattr(main.torch, "save", save)
    out = tmp_path / "o"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main.main(cli_args(out, **{**TRAIN, "steps": 8}))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 130 and err[-1].startswith("stopped: ") and "Traceback" not in "\n".join(err)
    monkeypatch.setattr(main.torch, "save", real)
    assert torch.load(out / "ckpt.pt", weights_only=True)["meta"]["step"] == 0
    assert not (out / "ckpt.pt.tmp").exists()


def test_ctrl_c_while_torch_loads_is_one_line_exit_130(tmp_path):
    # SIGINT at the moment main.py imports torch, as a Ctrl-C in the first second or so would land
    code = (
        "import os, runpy, signal, sys\n"
        "class Hit:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "sys.meta_path.insert(0, Hit())\n"
        f"sys.argv = ['main.py', '--out_dir={tmp_path / 'o'}']\n"
        f"runpy.run_path({os.path.join(ROOT, 'main.py')!r}, run_name='__main__')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 130 and p.stderr.strip().startswith("stopped: ") and len(p.stderr.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_a_run_that_fails_before_training_creates_no_wandb_run(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    w = fake_wandb(monkeypatch)
    blank = texts_file(tmp_path / "blank.parquet", [" "] * 50)
    error_after_prepare(capsys, cli_args(tmp_path / "o", data_files=blank, wandb_project="p", **TRAIN), "no text")
    assert len(w.logins) == 1 and w.inits == []  # the login was checked before the work; no run was started
    assert "wandb/" in pathlib.Path(os.path.join(ROOT, ".gitignore")).read_text().split()
