"""Real text for private batches: named data sets, user files, and seeded batch sampling."""

from __future__ import annotations

import csv
import gzip
import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from gradleak.errors import GradleakError

log = logging.getLogger(__name__)

DATA_DIR_ENV = "GRADLEAK_DATA_DIR"
TEXT_KEYS = ("text", "sentence", "review", "content")
LABEL_KEYS = ("label", "labels", "target", "class")


@dataclass(frozen=True)
class Example:
    text: str
    label: int | None = None


@dataclass(frozen=True)
class Batch:
    """A client's private batch: what the attack must never see."""

    input_ids: torch.Tensor  # (B, L), right-padded
    attention_mask: torch.Tensor  # (B, L)
    labels: torch.Tensor | None  # (B,) class labels, or None for language modelling
    texts: tuple[str, ...]  # the reference texts (decoded from the truncated tokens)
    token_ids: tuple[tuple[int, ...], ...]  # per sequence, non-pad tokens, specials included

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(len(t) for t in self.token_ids)

    def rows(self, start: int, stop: int) -> Batch:
        """The sequences start..stop-1 (a client's local mini-batch)."""
        labels = None if self.labels is None else self.labels[start:stop]
        return Batch(
            self.input_ids[start:stop],
            self.attention_mask[start:stop],
            labels,
            self.texts[start:stop],
            self.token_ids[start:stop],
        )

    def to(self, device: str | torch.device) -> Batch:
        labels = None if self.labels is None else self.labels.to(device)
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            labels,
            self.texts,
            self.token_ids,
        )


@dataclass(frozen=True)
class _Part:
    """One file of a named data set: packaged under `resource` (gzipped UTF-8), found at `relative`
    (in `encoding`) in a $GRADLEAK_DATA_DIR folder of the source layout."""

    resource: str
    relative: str
    encoding: str = "utf-8"


def _data_override() -> Path | None:
    """$GRADLEAK_DATA_DIR: a folder in the source layout that replaces the packaged copies."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else None


def _read_part(part: _Part) -> tuple[str, str]:
    """The text of one part, and where it came from (for messages)."""
    root = _data_override()
    if root is not None:
        path = root / part.relative
        if not path.is_file():
            raise GradleakError(f"data file not found: {path} ({DATA_DIR_ENV} is set to {root})")
        return path.read_text(encoding=part.encoding), str(path)
    resource = resources.files("gradleak").joinpath("resources", part.resource)
    try:
        raw = resource.read_bytes()
    except FileNotFoundError:
        raise GradleakError(f"packaged data file missing: gradleak/resources/{part.resource}") from None
    return gzip.decompress(raw).decode("utf-8"), f"packaged {part.resource}"


def _named(parts: Sequence[_Part], parse: Callable[[list[tuple[str, str]]], list[Example]]):
    def load() -> list[Example]:
        return parse([_read_part(part) for part in parts])

    return load


def _read_delimited_text(texts: list[tuple[str, str]]) -> list[Example]:
    [(text, where)] = texts
    return _parse_delimited(_lines(text), "\t", where)


def _read_rt(texts: list[tuple[str, str]]) -> list[Example]:
    pos, neg = texts
    out: list[Example] = []
    for (text, _), label in ((neg, 0), (pos, 1)):
        out.extend(Example(" ".join(line.split()), label) for line in _lines(text) if line.strip())
    return out


def _read_wikitext(texts: list[tuple[str, str]]) -> list[Example]:
    [(text, _)] = texts
    keep = [line.strip() for line in _lines(text) if line.strip() and not line.strip().startswith("=")]
    return [Example(line) for line in keep]


def _read_sample() -> list[Example]:
    text = resources.files("gradleak").joinpath("resources/sample.tsv").read_text("utf-8")
    return _parse_delimited(_lines(text), "\t", "built-in sample")


NAMED_DATA: dict[str, Callable[[], list[Example]]] = {
    "sample": _read_sample,
    "cola": _named([_Part("cola-dev.tsv.gz", "cola/dev.tsv")], _read_delimited_text),
    "sst2": _named([_Part("sst2-dev.tsv.gz", "sst2/dev.tsv")], _read_delimited_text),
    "rt": _named(
        [
            _Part("rt-polarity.pos.gz", "rt-polarity/rt-polarity.pos", "latin-1"),
            _Part("rt-polarity.neg.gz", "rt-polarity/rt-polarity.neg", "latin-1"),
        ],
        _read_rt,
    ),
    "wikitext": _named([_Part("wikitext-2-valid.txt.gz", "wikitext-2/valid.txt")], _read_wikitext),
}


def _lines(text: str) -> list[str]:
    """Split on newlines only: str.splitlines also breaks on \x85 and other separators that
    occur inside real sentences (Rotten Tomatoes has 23 of them)."""
    return [line.rstrip("\r") for line in text.split("\n")]


def _as_label(value: str) -> int | None:
    value = value.strip()
    if value.lstrip("-").isdigit():
        return int(value)
    return None


def _find_column(header: Sequence[str], name: str, kind: str, where: str) -> int:
    """The index of column `name` (case-insensitive) in `header`, or a one-line error listing them."""
    lowered = [c.strip().lower() for c in header]
    if name.strip().lower() not in lowered:
        listed = ", ".join(c.strip() for c in header) or "none"
        raise GradleakError(f"no {kind} column {name!r} in {where} (columns: {listed})")
    return lowered.index(name.strip().lower())


def _parse_delimited(
    lines: list[str],
    delimiter: str,
    where: str,
    text_column: str | None = None,
    label_column: str | None = None,
) -> list[Example]:
    rows = [r for r in csv.reader(lines, delimiter=delimiter) if any(c.strip() for c in r)]
    if not rows:
        raise GradleakError(f"no sentences in {where}")
    header = [c.strip().lower() for c in rows[0]]
    if text_column is not None or label_column is not None:
        # named columns: the first row is a header that must hold them
        text_col = (
            _find_column(rows[0], text_column, "text", where)
            if text_column is not None
            else next((header.index(k) for k in TEXT_KEYS if k in header), None)
        )
        if text_col is None:
            listed = ", ".join(c.strip() for c in rows[0])
            raise GradleakError(f"no text column in {where} (columns: {listed}); name one")
        label_col = (
            _find_column(rows[0], label_column, "label", where)
            if label_column is not None
            else next((header.index(k) for k in LABEL_KEYS if k in header), None)
        )
        rows = rows[1:]
    else:
        text_col = next((header.index(k) for k in TEXT_KEYS if k in header), None)
        if text_col is not None:
            label_col = next((header.index(k) for k in LABEL_KEYS if k in header), None)
            rows = rows[1:]
        else:
            first = rows[0]
            label_col = next((i for i, c in enumerate(first) if _as_label(c) is not None), None)
            text_candidates = [i for i in range(len(first)) if i != label_col]
            if not text_candidates:
                raise GradleakError(f"no text column in {where}")
            text_col = max(text_candidates, key=lambda i: len(first[i]))
    width = max(text_col, label_col or 0) + 1
    out: list[Example] = []
    for number, row in enumerate(rows, start=1):
        if len(row) < width:
            raise GradleakError(f"malformed row {number} in {where}: expected {width} columns")
        text = " ".join(row[text_col].split())
        label = None
        if label_col is not None:
            label = _as_label(row[label_col])
            if label is None:
                raise GradleakError(f"malformed label {row[label_col]!r} in row {number} of {where}")
        if text:
            out.append(Example(text, label))
    return out


def _read_delimited(
    path: Path, delimiter: str, text_column: str | None = None, label_column: str | None = None
) -> list[Example]:
    return _parse_delimited(_read_lines(path), delimiter, str(path), text_column, label_column)


def _read_lines(path: Path) -> list[str]:
    raw = path.read_bytes()
    try:
        return _lines(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return _lines(raw.decode("latin-1"))


def _read_jsonl(path: Path, text_column: str | None = None, label_column: str | None = None) -> list[Example]:
    out: list[Example] = []
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GradleakError(f"malformed JSON on line {number} of {path}: {exc.msg}") from None
        if isinstance(obj, str):
            out.append(Example(" ".join(obj.split())))
            continue
        if not isinstance(obj, dict):
            raise GradleakError(f"line {number} of {path} is neither an object nor a string")
        if text_column is not None:
            key = text_column
            if key not in obj:
                fields = ", ".join(map(str, obj)) or "none"
                raise GradleakError(f"line {number} of {path} has no text field {key!r} (fields: {fields})")
        else:
            key = next((k for k in TEXT_KEYS if k in obj), None)
            if key is None:
                raise GradleakError(f"line {number} of {path} has no text field ({', '.join(TEXT_KEYS)})")
        if label_column is not None:
            if label_column not in obj:
                fields = ", ".join(map(str, obj)) or "none"
                raise GradleakError(
                    f"line {number} of {path} has no label field {label_column!r} (fields: {fields})"
                )
            label_key = label_column
        else:
            label_key = next((k for k in LABEL_KEYS if k in obj), None)
        label = None
        if label_key is not None:
            label = _as_label(str(obj[label_key]))
            if label is None:
                raise GradleakError(f"malformed label on line {number} of {path}")
        out.append(Example(" ".join(str(obj[key]).split()), label))
    return out


def _read_plain(path: Path) -> list[Example]:
    return [Example(" ".join(line.split())) for line in _read_lines(path) if line.strip()]


# path, text column, label column -> examples
FILE_READERS: dict[str, Callable[[Path, str | None, str | None], list[Example]]] = {
    ".tsv": lambda p, t, lab: _read_delimited(p, "\t", t, lab),
    ".csv": lambda p, t, lab: _read_delimited(p, ",", t, lab),
    ".jsonl": _read_jsonl,
    ".json": _read_jsonl,
}


# ---------------------------------------------------------------- Hugging Face data sets

HF_PREFIX = "hf:"
HF_INSTALL = "pip install 'gradleak[hf]' (or pip install 'datasets>=2.18')"
# local files that `hf:PATH` loads with a `datasets` packaged builder: suffix -> (builder, options)
HF_FILE_BUILDERS: dict[str, tuple[str, dict[str, str]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"sep": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),
}


@dataclass(frozen=True)
class HFSource:
    """What `hf:NAME[:CONFIG][:SPLIT]` asks for. NAME is a Hub data set (`user/name`) or a local
    path (it starts with `/`, `.` or `~`, or exists): a folder written by `save_to_disk` loads with
    `load_from_disk`, any other folder with `load_dataset(folder)`, a file by its suffix
    (HF_FILE_BUILDERS). An empty CONFIG (`hf:imdb::test`) means the default one."""

    name: str
    config: str | None = None
    split: str | None = None

    @property
    def is_local(self) -> bool:
        return self.name.startswith(("/", ".", "~")) or Path(self.name).exists()


def parse_hf_source(source: str) -> HFSource:
    """Parse `hf:NAME[:CONFIG][:SPLIT]`."""
    if not source.startswith(HF_PREFIX):
        raise GradleakError(f"not a Hugging Face data source: {source!r} (expected hf:NAME[:CONFIG][:SPLIT])")
    parts = source[len(HF_PREFIX) :].split(":")
    if len(parts) > 3 or not parts[0].strip():
        raise GradleakError(f"malformed data {source!r}: expected hf:NAME[:CONFIG][:SPLIT]")
    parts += [""] * (3 - len(parts))
    name, config, split = (part.strip() for part in parts)
    return HFSource(name, config or None, split or None)


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise GradleakError(f"hf: data needs the datasets package: {HF_INSTALL}") from None
    return datasets


def _is_saved_dataset(folder: Path) -> bool:
    """A folder written by Dataset.save_to_disk (state.json) or DatasetDict.save_to_disk."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _fetch_hf(datasets, spec: HFSource, source: str):
    """The Dataset or DatasetDict that `spec` names (the datasets library's own exceptions pass)."""
    if not spec.is_local:
        return datasets.load_dataset(spec.name, spec.config)
    path = Path(spec.name).expanduser()
    if not path.exists():
        raise GradleakError(f"cannot load {source}: no such file or folder {path}")
    if path.is_dir() and _is_saved_dataset(path):
        if spec.config is not None:
            raise GradleakError(
                f"cannot load {source}: a folder written by save_to_disk has no configurations"
            )
        return datasets.load_from_disk(str(path))
    if path.is_file():
        builder = HF_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            kinds = ", ".join(HF_FILE_BUILDERS)
            raise GradleakError(f"cannot load {source}: unknown file type {path.suffix!r} (known: {kinds})")
        name, options = builder
        return datasets.load_dataset(name, data_files=str(path), **options)
    return datasets.load_dataset(str(path), spec.config)


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _choose_split(datasets, loaded, spec: HFSource, source: str):
    """The split to read: the one asked for, else `train` if present, else the first."""
    if not isinstance(loaded, datasets.Dataset):
        names = list(loaded.keys())
        if not names:
            raise GradleakError(f"cannot load {source}: it has no splits")
        if spec.split is None:
            chosen = "train" if "train" in names else names[0]
        elif spec.split in names:
            chosen = spec.split
        else:
            raise GradleakError(f"no split {spec.split!r} in {source} (splits: {', '.join(names)})")
        log.debug("%s: split %s of %s", source, chosen, names)
        return loaded[chosen]
    if spec.split is not None:
        raise GradleakError(f"{source} is a single saved split: drop the split {spec.split!r}")
    return loaded


def _pick_column(columns: list[str], name: str, kind: str, source: str) -> str:
    if name in columns:
        return name
    folded = [c for c in columns if c.lower() == name.lower()]
    if len(folded) == 1:
        return folded[0]
    raise GradleakError(f"no {kind} column {name!r} in {source} (columns: {', '.join(columns)})")


def _hf_label(value) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        return _as_label(value)
    return None


def _hf_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple):  # pre-tokenised rows: words
        value = " ".join(str(v) for v in value)
    return " ".join(str(value).split())


def _hf_examples(table, source: str, text_column: str | None, label_column: str | None) -> list[Example]:
    columns = list(table.column_names)
    if text_column is not None:
        text_key = _pick_column(columns, text_column, "text", source)
    else:
        lowered = {c.lower(): c for c in reversed(columns)}
        text_key = next((lowered[k] for k in TEXT_KEYS if k in lowered), None)
        if text_key is None:
            strings = [
                c
                for c in columns
                if getattr(table.features.get(c), "dtype", None) in ("string", "large_string")
            ]
            if len(strings) != 1:
                raise GradleakError(
                    f"no text column in {source}: name it (columns: {', '.join(columns) or 'none'})"
                )
            text_key = strings[0]
    if label_column is not None:
        label_key = _pick_column(columns, label_column, "label", source)
    else:
        lowered = {c.lower(): c for c in reversed(columns)}
        label_key = next((lowered[k] for k in LABEL_KEYS if k in lowered and lowered[k] != text_key), None)
    texts = [_hf_text(v) for v in table[text_key]]
    labels: list[int | None] = [None] * len(texts)
    if label_key is not None:
        raw = list(table[label_key])
        parsed = [_hf_label(v) for v in raw]
        bad = next((i for i, v in enumerate(parsed) if v is None), None)
        if bad is not None and label_column is not None:
            raise GradleakError(
                f"malformed label {raw[bad]!r} in row {bad + 1} of {source} (column {label_key!r})"
            )
        if bad is not None:
            log.warning(
                "%s: column %r is not integer labels (%r); loading without labels",
                source,
                label_key,
                raw[bad],
            )
        elif parsed and all(v == -1 for v in parsed):
            log.info("%s: every label is -1 (an unlabelled split); loading without labels", source)
        else:
            labels = parsed
    log.debug("%s: text column %r, label column %r", source, text_key, label_key if labels else None)
    return [Example(t, lab) for t, lab in zip(texts, labels, strict=True) if t]


def _load_hf(source: str, text_column: str | None, label_column: str | None) -> list[Example]:
    spec = parse_hf_source(source)
    datasets = _import_datasets()
    try:
        loaded = _fetch_hf(datasets, spec, source)
    except GradleakError:
        raise
    except Exception as exc:  # the datasets library and the Hub client raise many kinds; all mean "cannot"
        offline = bool(getattr(datasets.config, "HF_HUB_OFFLINE", False)) or bool(
            getattr(datasets.config, "HF_DATASETS_OFFLINE", False)
        )
        hint = (
            " (offline mode is on and it is not in the local cache)" if offline and not spec.is_local else ""
        )
        raise GradleakError(f"cannot load {source}{hint}: {_one_line(exc)}") from None
    table = _choose_split(datasets, loaded, spec, source)
    return _hf_examples(table, source, text_column, label_column)


# ---------------------------------------------------------------- the entry point


def load_examples(
    source: str, *, text_column: str | None = None, label_column: str | None = None
) -> list[Example]:
    """Examples from a named data set (`sample`, `cola`, `sst2`, `rt`, `wikitext`, packaged with
    gradleak), a file (TSV / CSV / JSONL / plain text), or a Hugging Face data set
    (`hf:NAME[:CONFIG][:SPLIT]`, see HFSource). `text_column` / `label_column` name the columns of a
    file with a header, a JSONL file or an `hf:` set; by default the text column is the first of
    TEXT_KEYS present and the label column the first of LABEL_KEYS (none: no labels)."""
    named_columns = text_column is not None or label_column is not None
    if source.startswith(HF_PREFIX):
        examples = _load_hf(source, text_column, label_column)
    elif source in NAMED_DATA:
        if named_columns:
            raise GradleakError(
                f"the named data set {source!r} has fixed columns: a column name cannot apply"
            )
        examples = NAMED_DATA[source]()
    else:
        path = Path(source)
        if not path.exists():
            names = ", ".join(NAMED_DATA)
            raise GradleakError(
                f"unknown data {source!r}: not a file, nor one of {names}, nor hf:NAME[:CONFIG][:SPLIT]"
            )
        if not path.is_file():
            raise GradleakError(f"data path {source!r} is not a file")
        reader = FILE_READERS.get(path.suffix.lower())
        if reader is None:
            if named_columns:
                raise GradleakError(f"{source} is plain text (a sentence a line): it has no columns to name")
            examples = _read_plain(path)
        else:
            examples = reader(path, text_column, label_column)
    if not examples:
        raise GradleakError(f"no sentences in data {source!r}")
    log.debug("loaded %d examples from %s", len(examples), source)
    return examples


def filter_by_words(
    examples: Sequence[Example], min_words: int = 0, max_words: int | None = None
) -> list[Example]:
    """Keep examples whose word count lies in [min_words, max_words]."""
    return [
        e
        for e in examples
        if len(e.text.split()) >= min_words and (max_words is None or len(e.text.split()) <= max_words)
    ]


def sample_examples(examples: Sequence[Example], batch_size: int, seed: int) -> list[Example]:
    """A seeded draw of `batch_size` distinct examples."""
    if batch_size < 1:
        raise GradleakError(f"batch size must be at least 1, got {batch_size}")
    if batch_size > len(examples):
        raise GradleakError(f"batch size {batch_size} is larger than the data ({len(examples)} sentences)")
    return random.Random(seed).sample(list(examples), batch_size)


def sample_with_tokens(
    examples: Sequence[Example], batch_size: int, seed: int, tokenizer, min_tokens: int
) -> list[Example]:
    """A seeded draw of `batch_size` distinct examples of at least `min_tokens` tokens each under
    `tokenizer` (specials included, as the batch holds them). With `min_tokens` 0 this is
    `sample_examples`; otherwise the examples are visited in a seeded shuffle and tokenised lazily
    (each cut at `min_tokens`) until the batch is full."""
    if min_tokens <= 0:
        return sample_examples(examples, batch_size, seed)
    if batch_size < 1:
        raise GradleakError(f"batch size must be at least 1, got {batch_size}")
    order = list(examples)
    random.Random(seed).shuffle(order)
    chosen: list[Example] = []
    for example in order:
        ids = tokenizer(example.text, truncation=True, max_length=min_tokens)["input_ids"]
        if len(ids) >= min_tokens:
            chosen.append(example)
            if len(chosen) == batch_size:
                return chosen
    if not chosen:
        raise GradleakError(f"no sentence has at least {min_tokens} tokens under the victim's tokenizer")
    raise GradleakError(
        f"only {len(chosen)} sentences have at least {min_tokens} tokens under the victim's tokenizer; "
        f"batch size is {batch_size}"
    )


def make_batch(
    examples: Sequence[Example],
    tokenizer,
    max_length: int = 32,
    *,
    with_labels: bool = True,
) -> Batch:
    """Tokenise examples into a right-padded batch; references are the decoded truncated tokens."""
    if max_length < 2:
        raise GradleakError(f"max length must be at least 2, got {max_length}")
    enc = tokenizer(
        [e.text for e in examples],
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    ids, mask = enc["input_ids"], enc["attention_mask"]
    token_ids = tuple(
        tuple(int(t) for t, m in zip(row, mrow, strict=True) if m)
        for row, mrow in zip(ids, mask, strict=True)
    )
    texts = tuple(tokenizer.decode(list(t), skip_special_tokens=True).strip() for t in token_ids)
    labels = None
    if with_labels:
        labels = torch.tensor([0 if e.label is None else e.label for e in examples], dtype=torch.long)
    return Batch(ids, mask, labels, texts, token_ids)
