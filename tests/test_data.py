"""Named data sets, file readers, seeded sampling and batching."""

from __future__ import annotations

from collections import Counter
from importlib import resources

import pytest
import torch

from gradleak.data import (
    DATA_DIR_ENV,
    Example,
    HFSource,
    filter_by_words,
    load_examples,
    make_batch,
    parse_hf_source,
    sample_examples,
)
from gradleak.errors import GradleakError


@pytest.fixture(autouse=True)
def _packaged_data(monkeypatch):
    """These tests pin the packaged copies: no $GRADLEAK_DATA_DIR override."""
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


def test_named_sets_are_packaged_and_found_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder above tmp_path holds data: nothing is searched for
    for name in (
        "cola-dev.tsv.gz",
        "sst2-dev.tsv.gz",
        "rt-polarity.pos.gz",
        "rt-polarity.neg.gz",
        "wikitext-2-valid.txt.gz",
        "DATA.md",
    ):
        assert resources.files("gradleak").joinpath("resources", name).is_file(), name
    assert len(load_examples("sst2")) == 1821


def test_cola():
    ex = load_examples("cola")
    assert len(ex) == 516
    assert Counter(e.label for e in ex) == {1: 354, 0: 162}
    assert ex[0] == Example("somebody just left guess who", 1)
    assert ex[-1] == Example("john talked to bill about himself", 1)


def test_sst2():
    ex = load_examples("sst2")
    assert len(ex) == 1821
    assert Counter(e.label for e in ex) == {0: 912, 1: 909}
    # label is the first column in this file; the text must not be the label
    assert ex[0] == Example("no movement , no yuks , not much of anything", 0)


def test_rt():
    ex = load_examples("rt")
    assert len(ex) == 10662
    assert Counter(e.label for e in ex) == {0: 5331, 1: 5331}
    # negatives first, then positives, each in file order
    assert ex[0] == Example("simplistic , silly and tedious .", 0)
    assert ex[5331].text.startswith('the rock is destined to be the 21st century\'s new " conan "')
    assert ex[5331].label == 1
    # the source is latin-1: its accented letters come through as such (stored as UTF-8)
    assert any("\u00e9" in e.text for e in ex)
    assert not any("\u00c3" in e.text for e in ex)  # no UTF-8 read as latin-1 (mojibake)


def test_builtin_sample():
    ex = load_examples("sample")
    assert len(ex) >= 16
    assert all(e.label in (0, 1) for e in ex)
    assert all(e.text and e.text == " ".join(e.text.split()) for e in ex)


def test_wikitext_has_no_headings():
    ex = load_examples("wikitext")
    assert len(ex) == 1841  # the 3,760 lines of valid.txt less blank lines and "= ... =" headings
    assert ex[0].text.startswith("Homarus gammarus , known as the European lobster or common lobster")
    assert all(e.label is None for e in ex)
    assert not any(e.text.startswith("=") for e in ex)


def test_data_dir_override_reads_the_source_layout(tmp_path, monkeypatch):
    (tmp_path / "cola").mkdir()
    (tmp_path / "cola" / "dev.tsv").write_text("a tiny  cola row\t0\n", encoding="utf-8")
    (tmp_path / "rt-polarity").mkdir()
    (tmp_path / "rt-polarity" / "rt-polarity.pos").write_bytes("caf\u00e9 fine\n".encode("latin-1"))
    (tmp_path / "rt-polarity" / "rt-polarity.neg").write_bytes(b"bad\n\n")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert load_examples("cola") == [Example("a tiny cola row", 0)]
    assert load_examples("rt") == [Example("bad", 0), Example("caf\u00e9 fine", 1)]
    assert len(load_examples("sample")) == 16  # built in, never overridden
    with pytest.raises(GradleakError, match="sst2/dev.tsv"):
        load_examples("sst2")


# ---------------------------------------------------------------- files


def test_tsv_with_header(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_text("sentence\tlabel\nthe cat  sat\t1\na dog ran\t0\n", encoding="utf-8")
    assert load_examples(str(p)) == [Example("the cat sat", 1), Example("a dog ran", 0)]


def test_csv_with_header_and_quotes(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('text,label\n"hello, world",1\nplain text,0\n', encoding="utf-8")
    assert load_examples(str(p)) == [Example("hello, world", 1), Example("plain text", 0)]


def test_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "first one", "label": 1}\n\n{"text": "second", "label": 0}\n', encoding="utf-8")
    assert load_examples(str(p)) == [Example("first one", 1), Example("second", 0)]


def test_plain_text(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("one sentence here\n\n  another   one \n", encoding="utf-8")
    assert load_examples(str(p)) == [Example("one sentence here"), Example("another one")]
    assert all(e.label is None for e in load_examples(str(p)))


def test_malformed_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "fine", "label": 1}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(GradleakError, match="line 2"):
        load_examples(str(p))


def test_jsonl_without_text_field(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"body": "no text key"}\n', encoding="utf-8")
    with pytest.raises(GradleakError):
        load_examples(str(p))


def test_bad_label_in_tsv(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_text("sentence\tlabel\nsome text\tpositive\n", encoding="utf-8")
    with pytest.raises(GradleakError):
        load_examples(str(p))


@pytest.mark.parametrize("suffix", [".txt", ".tsv", ".csv", ".jsonl"])
def test_empty_file(tmp_path, suffix):
    p = tmp_path / f"empty{suffix}"
    p.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(GradleakError):
        load_examples(str(p))


def test_missing_file(tmp_path):
    with pytest.raises(GradleakError, match="unknown data"):
        load_examples(str(tmp_path / "nope.tsv"))


def test_directory_is_not_data(tmp_path):
    with pytest.raises(GradleakError):
        load_examples(str(tmp_path))


# ---------------------------------------------------------------- filtering and sampling


def test_filter_by_words():
    ex = [Example("a"), Example("a b"), Example("a b c"), Example("a b c d")]
    assert filter_by_words(ex, 2, 3) == ex[1:3]
    assert filter_by_words(ex, 3) == ex[2:]
    assert filter_by_words(ex, 0, 1) == ex[:1]


def test_sample_examples_is_seeded():
    ex = load_examples("cola")
    a = sample_examples(ex, 8, seed=3)
    assert a == sample_examples(ex, 8, seed=3)
    assert a != sample_examples(ex, 8, seed=4)
    assert len(set(a)) == 8
    assert all(e in ex for e in a)


def test_sample_examples_bad_sizes():
    ex = [Example("a"), Example("b")]
    with pytest.raises(GradleakError):
        sample_examples(ex, 3, seed=0)
    with pytest.raises(GradleakError):
        sample_examples(ex, 0, seed=0)
    assert sorted(e.text for e in sample_examples(ex, 2, seed=0)) == ["a", "b"]


# ---------------------------------------------------------------- batches


def test_make_batch_right_padding_and_references(bert_tiny):
    tok = bert_tiny.tokenizer
    ex = [Example("the cat sat on the mat", 1), Example("hi", 0)]
    b = make_batch(ex, tok, 32)
    assert b.size == 2
    assert b.labels.tolist() == [1, 0]
    assert b.input_ids.shape == b.attention_mask.shape
    # right padding: each mask row is ones then zeros, and padded positions hold the pad id
    for row, mrow, toks in zip(b.input_ids, b.attention_mask, b.token_ids, strict=True):
        n = int(mrow.sum())
        assert mrow[:n].eq(1).all() and mrow[n:].eq(0).all()
        assert row[n:].eq(tok.pad_token_id).all()
        assert tuple(row[:n].tolist()) == toks
    assert b.lengths == (8, 3)  # [CLS] 6 words [SEP]; [CLS] hi [SEP]
    assert b.token_ids[1][0] == tok.cls_token_id and b.token_ids[1][-1] == tok.sep_token_id
    assert b.texts == ("the cat sat on the mat", "hi")
    for text, toks in zip(b.texts, b.token_ids, strict=True):
        assert text == tok.decode(list(toks), skip_special_tokens=True).strip()


def test_make_batch_truncation(bert_tiny):
    tok = bert_tiny.tokenizer
    ex = [Example("one two three four five six seven eight nine ten", 0)]
    b = make_batch(ex, tok, 6)
    assert b.input_ids.shape == (1, 6)
    assert b.lengths == (6,)
    assert b.token_ids[0][-1] == tok.sep_token_id
    # the reference is what survived truncation, not the original text
    assert b.texts == ("one two three four",)


def test_make_batch_without_labels_and_gpt2(gpt2_tiny):
    tok = gpt2_tiny.tokenizer
    ex = [Example("hello world, this is longer"), Example("short")]
    b = make_batch(ex, tok, 32, with_labels=False)
    assert b.labels is None
    assert b.texts == ("hello world, this is longer", "short")
    assert b.attention_mask[1].tolist() == [1] + [0] * (b.input_ids.shape[1] - 1)
    assert b.input_ids[1, 1:].eq(tok.pad_token_id).all()


def test_make_batch_unlabelled_examples_get_label_zero(bert_tiny):
    b = make_batch([Example("no label")], bert_tiny.tokenizer)
    assert b.labels.dtype == torch.long and b.labels.tolist() == [0]


def test_make_batch_max_length_too_small(bert_tiny):
    with pytest.raises(GradleakError):
        make_batch([Example("a b")], bert_tiny.tokenizer, 1)


def test_make_victim_batch_fixture(bert_tiny, make_victim_batch):
    b = make_victim_batch(bert_tiny, "cola", 4, 0, max_words=10)
    assert b.size == 4
    assert all(len(t.split()) <= 10 for t in b.texts)
    again = make_victim_batch(bert_tiny, "cola", 4, 0, max_words=10)
    assert again.texts == b.texts
    assert torch.equal(again.input_ids, b.input_ids)


# ---------------------------------------------------------------- Hugging Face data sets (offline)


@pytest.fixture
def hf_offline(monkeypatch, tmp_path):
    """The datasets library offline, its cache in tmp_path. The library reads HF_HUB_OFFLINE and
    HF_DATASETS_OFFLINE when imported, so its constants are patched as well as the environment."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
        monkeypatch.setattr(datasets.config, name, True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return datasets


def test_parse_hf_source():
    assert parse_hf_source("hf:glue:sst2:validation") == HFSource("glue", "sst2", "validation")
    assert parse_hf_source("hf:imdb") == HFSource("imdb")
    assert parse_hf_source("hf:imdb::test") == HFSource("imdb", None, "test")
    assert parse_hf_source("hf:user/set:cfg") == HFSource("user/set", "cfg")
    assert parse_hf_source("hf:/data/saved").is_local and parse_hf_source("hf:./x").is_local
    assert not parse_hf_source("hf:nonexistent-user/nonexistent-set").is_local
    for bad in ("hf:", "hf::cfg", "hf:a:b:c:d"):
        with pytest.raises(GradleakError, match=r"hf:NAME\[:CONFIG\]\[:SPLIT\]"):
            parse_hf_source(bad)


def test_hf_saved_dataset_dict_default_split_and_columns(hf_offline, tmp_path):
    rows = {"idx": [0, 1, 2], "Sentence": ["the  cat sat", "", "a dog ran"], "label": [1, 0, 0]}
    test = {"idx": [0], "Sentence": ["unlabelled"], "label": [-1]}
    saved = tmp_path / "saved"
    hf_offline.DatasetDict(
        {"validation": hf_offline.Dataset.from_dict(test), "train": hf_offline.Dataset.from_dict(rows)}
    ).save_to_disk(str(saved))
    # default split: train (present, though not first); text column "Sentence" found case-insensitively
    assert load_examples(f"hf:{saved}") == [Example("the cat sat", 1), Example("a dog ran", 0)]
    # an unlabelled split (every label -1) loads without labels
    assert load_examples(f"hf:{saved}::validation") == [Example("unlabelled")]
    # named columns
    assert load_examples(f"hf:{saved}", text_column="sentence", label_column="idx") == [
        Example("the cat sat", 0),
        Example("a dog ran", 2),
    ]
    with pytest.raises(GradleakError, match=r"no text column 'body' .*\(columns: idx, Sentence, label\)"):
        load_examples(f"hf:{saved}", text_column="body")
    with pytest.raises(GradleakError, match=r"no split 'test' .*\(splits: validation, train\)"):
        load_examples(f"hf:{saved}::test")


def test_hf_saved_single_dataset_and_first_split(hf_offline, tmp_path):
    one = tmp_path / "one"
    hf_offline.Dataset.from_dict({"review": ["good film", "bad film"], "stars": [5, 1]}).save_to_disk(
        str(one)
    )
    assert load_examples(f"hf:{one}") == [Example("good film"), Example("bad film")]
    assert load_examples(f"hf:{one}", label_column="stars") == [
        Example("good film", 5),
        Example("bad film", 1),
    ]
    with pytest.raises(GradleakError, match="single saved split"):
        load_examples(f"hf:{one}::train")
    two = tmp_path / "two"
    hf_offline.DatasetDict(
        {
            "dev": hf_offline.Dataset.from_dict({"text": ["dev row"]}),
            "test": hf_offline.Dataset.from_dict({"text": ["x"]}),
        }
    ).save_to_disk(str(two))
    assert load_examples(f"hf:{two}") == [Example("dev row")]  # no train: the first split


def test_hf_local_csv_file(hf_offline, tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('body,target\n"hello,  world",1\nplain text,0\n', encoding="utf-8")
    # no TEXT_KEYS column: the one string column is the text; "target" is a label key
    assert load_examples(f"hf:{p}") == [Example("hello, world", 1), Example("plain text", 0)]


def test_hf_offline_and_uncached_is_one_line(hf_offline):
    with pytest.raises(GradleakError) as err:
        load_examples("hf:nonexistent-user/nonexistent-set:default:train")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("cannot load hf:nonexistent-user/nonexistent-set:default:train")
    assert "offline" in message


def test_hf_without_the_datasets_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(GradleakError, match=r"needs the datasets package: pip install 'gradleak\[hf\]'"):
        load_examples("hf:imdb")


# ---------------------------------------------------------------- named columns in files


def test_text_and_label_columns_in_files(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("id,body,text,score\n1,the body,the text,0\n2,other body,other text,1\n", encoding="utf-8")
    assert load_examples(str(p))[0] == Example("the text", None)  # "text" is a TEXT_KEY; no label key
    assert load_examples(str(p), text_column="Body", label_column="score") == [
        Example("the body", 0),
        Example("other body", 1),
    ]
    with pytest.raises(GradleakError, match=r"no text column 'title' .*\(columns: id, body, text, score\)"):
        load_examples(str(p), text_column="title")
    j = tmp_path / "d.jsonl"
    j.write_text('{"body": "from json", "y": 1}\n', encoding="utf-8")
    assert load_examples(str(j), text_column="body", label_column="y") == [Example("from json", 1)]
    with pytest.raises(GradleakError, match=r"no text field 'text2' \(fields: body, y\)"):
        load_examples(str(j), text_column="text2")


def test_columns_do_not_apply_to_named_sets_or_plain_text(tmp_path):
    with pytest.raises(GradleakError, match="fixed columns"):
        load_examples("cola", text_column="sentence")
    p = tmp_path / "d.txt"
    p.write_text("a sentence\n", encoding="utf-8")
    with pytest.raises(GradleakError, match="plain text"):
        load_examples(str(p), text_column="text")
