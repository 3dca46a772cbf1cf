"""The shard pipeline: token parity, manifest schema, the val split, idempotence, crash safety, bad input."""

import itertools
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import FIXTURE, digest, main, tiny_cfg


def stream(out_dir, split):
    with open(os.path.join(out_dir, "manifest.json")) as f:
        m = json.load(f)
    parts = [np.fromfile(os.path.join(out_dir, s["file"]), dtype=np.uint16) for s in m["splits"][split]]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint16)


def split_docs(tokens):
    """EOS a1 EOS a2 ... -> [a1, a2, ...]"""
    assert tokens[0] == main.EOS_ID
    bounds = np.flatnonzero(tokens == main.EOS_ID).tolist() + [len(tokens)]
    return [tokens[a + 1 : b].tolist() for a, b in itertools.pairwise(bounds)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep")
    cfg = tiny_cfg(out, shard_tokens=20000, num_proc=2)
    return cfg, main.prepare(cfg, log=lambda *a: None)


def test_tokens_match_hf_gpt2_article_by_article_with_eos_before_each(prepared, fixture_texts, hf_tokenizer):
    cfg, m = prepared
    docs = split_docs(stream(cfg.out_dir, "train")) + split_docs(stream(cfg.out_dir, "val"))
    assert len(docs) == len(fixture_texts) == m["num_docs"]
    for doc, text in zip(docs, fixture_texts, strict=True):
        assert doc == hf_tokenizer.encode(text)


def test_manifest_schema_lists_shards_in_order_with_sizes(prepared):
    cfg, m = prepared
    for key, value in {
        "format_version": main.FORMAT_VERSION,
        "tokenizer": "gpt2",
        "eos_id": 50256,
        "dtype": "uint16",
    }.items():
        assert m[key] == value
    assert m["data"]["shard_tokens"] == 20000 and m["data"]["val_fraction"] == cfg.val_fraction
    assert len(m["fingerprint"]) == 16
    train = m["splits"]["train"]
    tag = m["fingerprint"][:8]  # shard names carry the data fingerprint, so a rebuild never overwrites a valid set
    assert [s["file"] for s in train] == [f"train_{tag}_{i:06d}.bin" for i in range(len(train))]
    assert len(m["content_hash"]) == 64 and all(len(s["sha256"]) == 64 for s in train)
    assert len(train) > 3 and all(s["tokens"] == 20000 for s in train[:-1]) and 0 < train[-1]["tokens"] <= 20000
    for split in ("train", "val"):
        for s in m["splits"][split]:
            assert os.path.getsize(os.path.join(cfg.out_dir, s["file"])) == 2 * s["tokens"]


def test_val_split_is_the_last_articles_at_a_boundary(prepared, fixture_texts):
    cfg, m = prepared
    val = stream(cfg.out_dir, "val")
    n_val = m["num_docs_split"]["val"]
    assert n_val == round(len(fixture_texts) * cfg.val_fraction) == 6
    assert val[0] == main.EOS_ID and int((val == main.EOS_ID).sum()) == n_val
    assert m["num_docs_split"]["train"] + n_val == len(fixture_texts)


def test_rerun_reuses_shards_without_reading_the_articles(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path)
    main.prepare(cfg, log=lambda *a: None)
    before = {n: os.stat(tmp_path / n).st_mtime_ns for n in os.listdir(tmp_path)}

    def must_not_read(*a):
        raise AssertionError("the articles were read again on a rerun")

    monkeypatch.setattr(main, "read_rows", must_not_read)
    main.prepare(tiny_cfg(tmp_path, lr=1e-2, n_layer=3, steps=7), log=lambda *a: None)  # non-data fields differ
    assert {n: os.stat(tmp_path / n).st_mtime_ns for n in os.listdir(tmp_path)} == before
    with pytest.raises(main.UserError, match="read again"):  # what a rebuild would do
        main.prepare(tiny_cfg(tmp_path, max_docs=20), log=lambda *a: None)


def test_changed_max_docs_rebuilds_and_removes_stale_shards(tmp_path):
    main.prepare(tiny_cfg(tmp_path, shard_tokens=10000), log=lambda *a: None)
    assert len(os.listdir(tmp_path)) > 10
    m = main.prepare(tiny_cfg(tmp_path, shard_tokens=10000, max_docs=20), log=lambda *a: None)
    assert m["num_docs"] == 20
    listed = {s["file"] for sp in m["splits"].values() for s in sp}
    assert {n for n in os.listdir(tmp_path) if n[0] != "."} == listed | {"manifest.json"}


@pytest.mark.parametrize("damage", ["truncate_shard", "delete_shard", "corrupt_manifest"])
def test_damaged_output_is_detected_and_rebuilt_with_a_notice(tmp_path, damage):
    cfg = tiny_cfg(tmp_path, shard_tokens=50000)
    m = main.prepare(cfg, log=lambda *a: None)
    clean = digest(tmp_path)
    if damage == "truncate_shard":
        with open(tmp_path / m["splits"]["train"][1]["file"], "r+b") as f:
            f.truncate(1000)
    elif damage == "delete_shard":
        os.remove(tmp_path / m["splits"]["val"][0]["file"])
    else:
        (tmp_path / "manifest.json").write_text('{"format_version": 1, "splits": ')
    notes = []
    main.prepare(cfg, log=notes.append)
    assert digest(tmp_path) == clean
    assert len(notes) == 2 and "rebuilding" in notes[0]


def test_a_damaged_shard_put_back_with_an_older_mtime_is_refused(tmp_path):
    cfg = tiny_cfg(tmp_path)
    m = main.prepare(cfg, log=lambda *a: None)
    p = tmp_path / m["splits"]["train"][0]["file"]
    st = os.stat(p)
    with open(p, "r+b") as f:
        f.write(bytes(64))  # 32 ids zeroed: same size, every id still in the vocabulary
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns - 10**10))  # what cp -p, rsync -a or tar x of a bad copy leave
    mst = os.stat(tmp_path / "manifest.json")  # the manifest written a while after that shard, as on a big build
    os.utime(tmp_path / "manifest.json", ns=(mst.st_atime_ns, mst.st_mtime_ns - 5 * 10**9))
    with pytest.raises(main.UserError, match="does not match the sha256"):
        main.prepare(cfg, log=lambda *a: None)


# --- bad input: one clear error, nothing half-written -------------------------------------------------------


def assert_fails_cleanly(capsys, args, out_dir, *words):
    """main.main(ARGS) in this process: exit 2 and, as its last line on stderr, one `error:` line naming every word;
    nothing half-written left in out_dir."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main.main(args + [f"--out_dir={out_dir}", "--prepare_only=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("error:") and not any("Traceback" in ln for ln in err), err[-5:]
    for w in words:
        assert w in err[-1], err[-1]
    leftover = os.listdir(out_dir) if os.path.exists(out_dir) else []
    assert not [n for n in leftover if n.endswith((".bin", ".json", ".tmp"))], leftover


def test_unknown_dump_is_one_clear_error_naming_both_families(tmp_path, monkeypatch, capsys):
    assert_fails_cleanly(capsys, ["--wiki_config=20220301.xx"], tmp_path / "o", "20231101.en", "20220301", "unknown")
    monkeypatch.setenv("WIKI_DUMP", "en")
    assert_fails_cleanly(capsys, [], tmp_path / "o3", "unknown Wikipedia dump 'en'")


def test_unreachable_hub_says_how_to_use_local_parquet(tmp_path, capsys):
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest: the tests never touch the network
    assert_fails_cleanly(capsys, ["--wiki_config=20231101.en"], tmp_path / "o", "--data_files")


def test_parquet_without_text_column(tmp_path, capsys):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["1"], "body": ["hello"]}), bad)
    assert_fails_cleanly(capsys, [f"--data_files={bad}"], tmp_path / "o", "no 'text' column")


def test_empty_dataset(tmp_path, capsys):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}), empty)
    assert_fails_cleanly(capsys, [f"--data_files={empty}"], tmp_path / "o", "no articles")


@pytest.mark.parametrize(
    "arg,words",
    [
        ("--val_fraction=0", "(0, 1)"),
        ("--val_fraction=1.0", "(0, 1)"),
        ("--shard_tokens=0", "positive"),
        ("--shard_tokens=-5", "positive"),
    ],
)
def test_bad_config_values(tmp_path, capsys, arg, words):
    assert_fails_cleanly(capsys, [f"--data_files={FIXTURE}", arg], tmp_path / "o", words)


def test_too_few_tokens_for_one_window(tmp_path, capsys):
    assert_fails_cleanly(
        capsys,
        [f"--data_files={FIXTURE}", "--max_docs=3", "--seq_len=4096"],
        tmp_path / "o",
        "fewer than one seq_len+1",
    )


def test_missing_data_files(tmp_path, capsys):
    assert_fails_cleanly(capsys, [f"--data_files={tmp_path}/nothing*.parquet"], tmp_path / "o", "no file matches")
