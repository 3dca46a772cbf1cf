"""Prepare at scale: resume after kill -9 / Ctrl-C / reader errors, workers that read their own input, the seed's
20220301 dumps, and data safety (old shards kept until a rebuild is complete, only recorded files deleted, an
identity that survives touch/move/copy)."""

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import FIXTURE, ROOT, digest, made_once, main, tiny_cfg, wait_for

quiet = dict(log=lambda *a: None)


SHARD = 20000  # tokens per shard: the dump below makes about 17 train shards


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    """A dump-shaped input: 3 parquet files of 32 articles each (about 380k tokens), in row groups of 16."""

    def make(d):
        twice = pq.read_table(FIXTURE)
        twice = pa.concat_tables([twice, twice])
        for i in range(3):
            pq.write_table(twice.slice(i * 20, 32), d / f"train-{i:05d}-of-00003.parquet", row_group_size=16)

    return str(made_once(tmp_path_factory, "dump", make)[0] / "*.parquet")


def args_for(data_files, out_dir, **kw):
    kw = {
        "data_files": data_files,
        "out_dir": out_dir,
        "prepare_only": "true",
        "num_proc": 2,
        "shard_tokens": SHARD,
        **kw,
    }
    return [f"--{k}={v}" for k, v in kw.items()]


@pytest.fixture(scope="module")
def clean(dump, tmp_path_factory):
    """An unbroken prepare of `dump`, to compare every interrupted one with: (out_dir, digest, manifest)."""
    out, _ = made_once(tmp_path_factory, "clean", lambda out: main.main(args_for(dump, out)))
    return out, digest(out), json.loads((out / "manifest.json").read_text())


# Runs main.main(ARGS) once per job, each in a child forked from one process that has imported main.py once (a
# fresh interpreter per job would import torch each time), and SIGKILLs the child (no clean-up of any kind) at the
# nth call of module.attr whose first argument contains `match`, just before or just after that call. Prints each
# child's wait status.
KILLER = """
import json, os, signal, sys
sys.path.insert(0, {root!r})
import main
for args, owner, attr, match, when, nth in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        owner = main if owner == "main" else os
        real, calls = getattr(owner, attr), [0]
        def wrapped(*a, **k):
            hit = match in str(a[0]) if a else True
            calls[0] += hit
            if hit and when == "before" and calls[0] == nth: os.kill(os.getpid(), signal.SIGKILL)
            out = real(*a, **k)
            if hit and when == "after" and calls[0] == nth: os.kill(os.getpid(), signal.SIGKILL)
            return out
        setattr(owner, attr, wrapped)
        try:
            main.main(args)
        finally:
            os._exit(0)
    print("wait status", os.waitpid(pid, 0)[1], flush=True)
"""


def run_killed(*jobs):
    """Each job (args, "main" or "os", attr, match, "before" or "after", nth) runs and must die by SIGKILL."""
    p = subprocess.run(
        [sys.executable, "-c", KILLER.format(root=ROOT), json.dumps(jobs)], capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-2000:]
    statuses = [int(line.split()[-1]) for line in p.stdout.splitlines() if line.startswith("wait status")]
    assert statuses == [signal.SIGKILL] * len(jobs), (statuses, p.stderr[-2000:])


def progress(out_dir):
    return json.load(open(os.path.join(out_dir, main.PROGRESS)))


POINTS = {  # progress record #1 is written before any shard; #k+1 follows shard k
    "between a shard's rename and its progress record": ("main", "write_json_atomic", main.PROGRESS, "before", 4),
    "after a progress record": ("main", "write_json_atomic", main.PROGRESS, "after", 8),
    "inside a shard write (temp file left)": ("os", "replace", ".bin.tmp", "before", 6),
    "at the train/val boundary": ("main", "write_json_atomic", main.PROGRESS, "before", None),  # n_train + 1
}


@pytest.fixture(scope="module")
def killed(dump, clean, tmp_path_factory):
    """{point: out_dir of a prepare of `dump` killed -9 there}, all killed in one go; and "after the switch": an
    out_dir holding a finished prepare of `dump`, then a prepare of its first 50 articles killed just after its
    manifest.json took the old one's place, before the old set is deleted. Each test changes only its own out_dir."""
    n_train = len(clean[2]["splits"]["train"])

    def make(folder):
        dirs = {point: folder / f"killed{i}" for i, point in enumerate([*POINTS, "after the switch"])}
        for d in dirs.values():
            d.mkdir()
        main.prepare(tiny_cfg(dirs["after the switch"], data_files=dump, shard_tokens=SHARD), **quiet)
        run_killed(
            *[
                (args_for(dump, str(dirs[point])), owner, attr, match, when, nth or n_train + 1)
                for point, (owner, attr, match, when, nth) in POINTS.items()
            ],
            (args_for(dump, str(dirs["after the switch"]), max_docs=50), "os", "replace", "manifest.json", "after", 1),
        )
        return {point: str(d) for point, d in dirs.items()}

    return {point: Path(d) for point, d in made_once(tmp_path_factory, "killed", make)[1].items()}


@pytest.mark.parametrize("point", list(POINTS))
def test_kill_9_then_rerun_gives_identical_bytes_and_resumes(dump, clean, killed, capsys, point):
    out, (_, attr, _, when, _) = killed[point], POINTS[point]
    assert not (out / "manifest.json").exists()
    done = len(progress(out)["splits"]["train"])
    assert done >= 2
    if attr == "write_json_atomic" and when == "before":  # the shard is on disk, its record is not
        assert os.path.exists(out / main.shard_name("train", clean[2]["fingerprint"][:8], done))
    capsys.readouterr()
    main.main(args_for(dump, out))
    assert f"resuming after {done} train" in capsys.readouterr().out  # less work: it starts after finished shards
    assert digest(out) == clean[1]


def prepare_until_reading_fails(cfg, monkeypatch, fails, error):
    """main.prepare(cfg) with read_rows raising `error` for the first task where fails(task) holds, in whichever
    process reads it: one line, and at least two finished shards stay on record. -> the progress record."""
    real = main.read_rows

    def flaky(*task):
        if fails(task):
            raise error
        return real(*task)

    monkeypatch.setattr(main, "read_rows", flaky)
    with pytest.raises(main.UserError, match=f"{type(error).__name__}: {error}.*rerun continues"):
        main.prepare(cfg, **quiet)
    monkeypatch.setattr(main, "read_rows", real)
    done = progress(cfg.out_dir)
    assert len(done["splits"]["train"]) >= 2 and set(done["next"]) == {"article", "skip_tokens", "empty"}
    return done


def test_reader_error_mid_stream_keeps_finished_shards_and_rerun_continues(dump, clean, tmp_path, monkeypatch):
    clean_dir, clean_digest, _ = clean
    cfg = tiny_cfg(tmp_path, data_files=dump, shard_tokens=SHARD, num_proc=1)
    calls = []
    prepare_until_reading_fails(
        cfg, monkeypatch, lambda task: calls.append(task) or len(calls) == 4, OSError("connection reset by peer")
    )
    notes = []
    main.prepare(cfg, log=notes.append)
    assert "resuming after" in notes[0] and digest(tmp_path) == clean_digest
    assert "(resumed at article " in notes[-1]  # the summary says the build continued


def test_a_killed_builds_shard_damaged_in_place_is_refused_before_the_build_continues(dump, tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, data_files=dump, shard_tokens=SHARD, num_proc=1)
    calls = []
    done = prepare_until_reading_fails(
        cfg, monkeypatch, lambda task: calls.append(task) or len(calls) == 4, OSError("connection reset by peer")
    )
    with open(tmp_path / done["splits"]["train"][0]["file"], "r+b") as f:
        f.write(bytes(64))  # same size: only the hash can tell
    with pytest.raises(main.UserError, match="does not match the sha256"):
        main.prepare(cfg, **quiet)
    assert not (tmp_path / "manifest.json").exists()


@pytest.mark.parametrize("num_proc", [1, 2, 3])
def test_same_bytes_whatever_the_number_of_workers(dump, clean, tmp_path, num_proc):
    main.prepare(tiny_cfg(tmp_path, data_files=dump, shard_tokens=SHARD, num_proc=num_proc), **quiet)
    assert digest(tmp_path) == clean[1]


# --- the hub: 20220301 (legacy-datasets/wikipedia) and 20231101 (wikimedia/wikipedia), a local folder in its place -

LEGACY_EN = "datasets/legacy-datasets/wikipedia/data/20220301.en"


@pytest.fixture
def fake_hub(dump, tmp_path, monkeypatch):
    """main.hub_filesystem() is a local folder laid out like the hub (an fsspec DirFileSystem, as HfFileSystem is
    an fsspec filesystem); publish(folder) puts `dump`'s files there, and .globs records what main.py asked for."""
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    root = tmp_path / "hub"
    fs = DirFileSystem(str(root), LocalFileSystem(), skip_instance_cache=True)
    fs.globs, real_glob = [], fs.glob

    def recorded_glob(pattern, **kw):
        fs.globs.append(pattern)
        return real_glob(pattern, **kw)

    def publish(folder):
        (root / folder).mkdir(parents=True)
        for f in glob.glob(dump):
            shutil.copy(f, root / folder)

    fs.glob, fs.publish = recorded_glob, publish
    monkeypatch.setattr(main, "hub_filesystem", lambda: fs)
    return fs


def hub_cfg(out_dir, **kw):
    return tiny_cfg(out_dir, **{"data_files": None, "wiki_config": "20220301.en", "shard_tokens": SHARD, **kw})


@pytest.mark.parametrize(
    "dump_name,files",
    [
        *[
            (f"20220301.{lang}", f"hf://datasets/legacy-datasets/wikipedia/data/20220301.{lang}/*.parquet")
            for lang in ("en", "de", "fr", "frr", "it", "simple")
        ],
        ("20231101.en", "hf://datasets/wikimedia/wikipedia/20231101.en/*.parquet"),
    ],
)
def test_hub_dump_paths(fake_hub, tmp_path, dump_name, files):
    fake_hub.publish(files[len("hf://") : -len("/*.parquet")])
    m = main.prepare(hub_cfg(tmp_path / "o", wiki_config=dump_name, max_docs=30), **quiet)
    assert fake_hub.globs == [files[len("hf://") :]]
    assert m["num_docs"] == 30 and m["data"]["wiki_config"] == dump_name and m["data"]["hub_files"] == files


def test_hub_without_the_dump_or_unreachable_is_one_line(fake_hub, tmp_path, monkeypatch):
    with pytest.raises(main.UserError, match="unknown Wikipedia dump '20231101.zz'"):  # no files for that language
        main.prepare(hub_cfg(tmp_path, wiki_config="20231101.zz"), **quiet)

    class ConnectError(Exception):  # like httpx's: not a ConnectionError
        pass

    def unreachable(pattern, **kw):
        raise ConnectError("Name or service not known")

    monkeypatch.setattr(fake_hub, "glob", unreachable)
    with pytest.raises(main.UserError) as e:
        main.prepare(hub_cfg(tmp_path), **quiet)
    assert "cannot reach the Hugging Face hub" in str(e.value) and "--data_files" in str(e.value)
    assert "unknown" not in str(e.value)


def prepare_until_the_hub_fails(cfg, monkeypatch):
    """The hub fails at the first row group of the dump's third file."""

    def third_file(task):
        assert task[0].startswith("hf://" + LEGACY_EN + "/train-")
        return task[0].endswith("00002-of-00003.parquet") and task[1] == 0

    return prepare_until_reading_fails(cfg, monkeypatch, third_file, ConnectionError("the hub went away"))


@pytest.mark.parametrize("num_proc", [1, 2])
def test_hub_gives_the_local_bytes_and_a_read_error_mid_prepare_resumes(
    fake_hub, clean, tmp_path, monkeypatch, num_proc
):
    fake_hub.publish(LEGACY_EN)
    cfg = hub_cfg(tmp_path, num_proc=num_proc)
    done = prepare_until_the_hub_fails(cfg, monkeypatch)
    notes = []
    m = main.prepare(cfg, log=notes.append)
    assert f"resuming after {len(done['splits']['train'])} train" in notes[0]
    assert m["content_hash"] == clean[2]["content_hash"]  # the same tokens as the local prepare of the same files


def test_a_dump_rewritten_on_the_hub_between_kill_and_rerun_starts_over(fake_hub, tmp_path, monkeypatch):
    fake_hub.publish(LEGACY_EN)
    cfg = hub_cfg(tmp_path / "o", num_proc=1)
    prepare_until_the_hub_fails(cfg, monkeypatch)
    first = glob.glob(str(tmp_path / "hub" / LEGACY_EN / "*00000-of-*.parquet"))[0]
    pq.write_table(pq.read_table(first).slice(5), first, row_group_size=16)  # a new revision of the first file
    notes = []
    m = main.prepare(cfg, log=notes.append)
    assert "input files changed" in notes[0] and not any("resuming" in n for n in notes)
    fresh = main.prepare(hub_cfg(tmp_path / "fresh", num_proc=1), **quiet)
    assert m["content_hash"] == fresh["content_hash"] and digest(tmp_path / "o") == digest(tmp_path / "fresh")


@pytest.mark.parametrize("num_proc", [1, 2, 3])
def test_hub_same_bytes_whatever_the_number_of_workers(fake_hub, clean, tmp_path, num_proc):
    fake_hub.publish(LEGACY_EN)
    assert main.prepare(hub_cfg(tmp_path, num_proc=num_proc), **quiet)["content_hash"] == clean[2]["content_hash"]


def test_hub_articles_are_read_by_the_workers_not_the_main_process(fake_hub, clean, tmp_path, monkeypatch):
    fake_hub.publish(LEGACY_EN)
    parent, real_read, real_tasks = os.getpid(), main.read_rows, main.parquet_tasks

    def read_in_a_worker(*task):
        assert os.getpid() != parent, "article text read in the main process"
        return real_read(*task)

    def tasks(files, task_rows, at, n_train, n):  # what the main process hands a worker: a path and 3 numbers
        for job in real_tasks(files, task_rows, at, n_train, n):
            (path, row_group, lo, hi), first, end = job
            assert path.startswith("hf://") and all(type(x) is int for x in (row_group, lo, hi))
            assert hi - lo == 16 or n_train in (first, end)  # whole row groups, cut only at the train/val boundary
            yield job

    monkeypatch.setattr(main, "read_rows", read_in_a_worker)
    monkeypatch.setattr(main, "parquet_tasks", tasks)
    assert main.prepare(hub_cfg(tmp_path, num_proc=2), **quiet)["content_hash"] == clean[2]["content_hash"]


# --- data safety ------------------------------------------------------------------------------------------------


def damaged_copy(src, dst):
    """src rewritten in row groups of 16, with bytes in the middle scrambled: reading fails part-way through."""
    pq.write_table(pq.read_table(src), dst, row_group_size=16)
    data = bytearray(dst.read_bytes())
    mid = pq.ParquetFile(dst).metadata.row_group(2).column(3).data_page_offset
    for i in range(mid + 200, mid + 2200):
        data[i] = (data[i] * 7 + 13) % 256
    dst.write_bytes(data)


def test_failed_rebuild_keeps_the_old_set_usable(tmp_path):
    cfg = tiny_cfg(tmp_path / "o", shard_tokens=20000)
    m = main.prepare(cfg, **quiet)
    before = digest(cfg.out_dir)
    damaged_copy(FIXTURE, tmp_path / "damaged.parquet")
    with pytest.raises(main.UserError, match=r"damaged.parquet \(row group \d+\) is damaged"):
        main.prepare(tiny_cfg(cfg.out_dir, data_files=str(tmp_path / "damaged.parquet"), shard_tokens=20000), **quiet)
    after = digest(cfg.out_dir)
    assert {n: after[n] for n in before} == before  # every old file, byte for byte
    assert main.load_manifest(cfg.out_dir)[0] == m
    notes = []
    assert main.prepare(cfg, log=notes.append) == m and "reusing" in notes[0]


def test_kill_9_after_the_switch_still_deletes_the_old_set(dump, clean, killed, capsys):
    out, old = killed["after the switch"], clean[2]  # the old set: the same as the clean prepare's
    assert json.loads((out / "manifest.json").read_text())["num_docs"] == 50
    assert set(main.listed_shards(old)) <= set(os.listdir(out))  # still there
    capsys.readouterr()
    main.main(args_for(dump, out, max_docs=50))
    assert "reusing" in capsys.readouterr().out
    new = json.loads((out / "manifest.json").read_text())
    kept = {n for n in os.listdir(out) if n[0] != "."}  # not the lock files
    assert kept == set(main.listed_shards(new)) | {"manifest.json"}
    assert not set(main.listed_shards(old)) & set(os.listdir(out))


def test_touch_move_or_copy_of_the_source_does_not_rebuild(tmp_path):
    src = tmp_path / "a" / "wiki.parquet"
    src.parent.mkdir()
    shutil.copy(FIXTURE, src)
    out = tmp_path / "o"
    m = main.prepare(tiny_cfg(out, data_files=str(src)), **quiet)
    os.utime(src, (1, 1))  # touch
    moved = tmp_path / "b" / "wiki.parquet"
    moved.parent.mkdir()
    shutil.move(src, moved)
    for path in (moved, shutil.copy(moved, tmp_path / "wiki.parquet")):
        notes = []
        got = main.prepare(tiny_cfg(out, data_files=str(path)), log=notes.append)
        assert {**got, "request": m["request"]} == m and "reusing" in notes[0]
        assert got["request"]["data_files"] == str(path)  # the manifest follows the input, for when it is gone
    tbl = pq.read_table(moved)  # a real change of the content is still caught
    pq.write_table(tbl.set_column(3, "text", pa.array(["changed"] + tbl.column("text").to_pylist()[1:])), moved)
    notes = []
    assert main.prepare(tiny_cfg(out, data_files=str(moved)), log=notes.append)["fingerprint"] != m["fingerprint"]
    assert "rebuilding" in notes[0]


def test_cleanup_deletes_only_files_main_py_recorded(dump, tmp_path):
    strays = ["manifest.json.bak", "train_000000.bin", "val_000001.bin", "train_deadbeef_000000.bin", "notes.txt"]
    for n in strays:
        (tmp_path / n).write_bytes(b"mine")
    old = main.prepare(tiny_cfg(tmp_path, data_files=dump, shard_tokens=SHARD), **quiet)
    new = main.prepare(tiny_cfg(tmp_path, data_files=dump, shard_tokens=SHARD, max_docs=50), **quiet)
    assert set(os.listdir(tmp_path)) == set(strays) | set(main.listed_shards(new)) | {"manifest.json"}
    assert all((tmp_path / n).read_bytes() == b"mine" for n in strays)
    assert old["fingerprint"] != new["fingerprint"]


# --- processes ----------------------------------------------------------------------------------------------------


def children(pid):
    """Live (non-zombie) processes whose parent is pid."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid and stat[0] != "Z":
                out.append(int(d))
    return out


def alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def big_dump(tmp_path):
    big = tmp_path / "x5.parquet"  # 1.2M tokens: 60 shards, time enough to see workers and shards appear
    pq.write_table(pa.concat_tables([pq.read_table(FIXTURE)] * 5), big, row_group_size=16)
    return str(big)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_exit_when_main_is_killed(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "main.py")] + args_for(big_dump(tmp_path), tmp_path / "o"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert wait_for(lambda: len(children(proc.pid)) >= 2, proc), "no pool workers seen"
        workers = children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)  # the parent only, as the OOM killer would
        proc.wait()
        assert wait_for(lambda: not any(alive(w) for w in workers), timeout=30), "orphaned workers still running"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_ctrl_c_during_prepare_is_one_line_and_the_rerun_continues(tmp_path, capsys):
    data, out = big_dump(tmp_path), tmp_path / "o"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "main.py")] + args_for(data, out),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )

    def shards():
        return out.exists() and sum(n.endswith(".bin") for n in os.listdir(out)) >= 3

    assert wait_for(shards, proc), "prepare finished before Ctrl-C"
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group, workers included
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (130, 2) and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(("stopped:", "error:")), err[-2000:]
    capsys.readouterr()
    main.main(args_for(data, out))
    assert "resuming after" in capsys.readouterr().out
    main.prepare(tiny_cfg(tmp_path / "clean", data_files=data, shard_tokens=SHARD, num_proc=2), **quiet)
    assert digest(out) == digest(tmp_path / "clean")
