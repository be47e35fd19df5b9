"""Data preparation: raw jsonl / jsonl.gz / txt per domain -> packed MDS rows + manifest.

The expected rows are rebuilt independently: each source document is encoded with the Hugging
Face tokenizer directly, EOS appended, documents concatenated in the manifest's file order and
cut into seq_len rows.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random

import numpy as np
import pytest

from llmshearing.data.cli import register
from llmshearing.data.documents import doc_is_eval, token_dtype
from llmshearing.data.manifest import check_manifest, format_summary
from llmshearing.data.prep import prepare
from llmshearing.data.tokenizer import load_tokenizer, train_tokenizer

SEQ = 32
SEED = 5
EVAL_FRACTION = 0.2
WORDS = ("the of and to in is was for on with as by at from def return class import lambda self "
         "über naïve 数据 🙂 \t").split(" ")


def _doc(rng: random.Random, tag: str) -> str:
    return f"{tag} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three domains in three formats; returns (raw root, {domain: {relpath: [docs]}}, tokenizer dir)."""
    raw = tmp_path_factory.mktemp("raw")
    rng = random.Random(0)
    docs: dict[str, dict[str, list[str]]] = {"cc": {}, "github": {}, "book": {}}
    (raw / "cc" / "sub").mkdir(parents=True)
    for rel, n in (("a.jsonl", 40), ("sub/b.jsonl", 30)):
        docs["cc"][rel] = [_doc(rng, f"cc{rel}{i}") for i in range(n)]
        with open(raw / "cc" / rel, "w") as f:
            for i, d in enumerate(docs["cc"][rel]):
                f.write(json.dumps({"text": d, "meta": {"i": i}}) + "\n")
                if i == 3:
                    f.write("\n")  # blank lines are skipped
    (raw / "cc" / "notes.md").write_text("not data")  # ignored in folders
    (raw / "github").mkdir()
    for rel, n in (("x.jsonl.gz", 25), ("y.jsonl.gz", 20)):
        docs["github"][rel] = [_doc(rng, f"gh{rel}{i}") for i in range(n)]
        with gzip.open(raw / "github" / rel, "wt") as f:
            for d in docs["github"][rel]:
                f.write(json.dumps({"text": d}) + "\n")
    (raw / "book").mkdir()
    for i in range(12):
        docs["book"][f"{i:02d}.txt"] = [_doc(rng, f"book{i}") * 3]
        (raw / "book" / f"{i:02d}.txt").write_text(docs["book"][f"{i:02d}.txt"][0])
    all_texts = [t for d in docs.values() for f in d.values() for t in f]
    tok_dir = train_tokenizer(all_texts, vocab_size=300, out_dir=tmp_path_factory.mktemp("tok"))
    return raw, docs, tok_dir


def _sources(raw):
    return {"cc": raw / "cc", "github": str(raw / "github" / "*.jsonl.gz"), "book": raw / "book"}


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    raw, docs, tok_dir = corpus
    out = tmp_path_factory.mktemp("prep")
    # small chunk_bytes: cc files are tokenized in several byte-range chunks
    m = prepare(_sources(raw), tok_dir, out, SEQ, eval_fraction=EVAL_FRACTION, seed=SEED, workers=2,
                chunk_bytes=700, progress=False)
    return out, m


def test_packing_without_bos(corpus, tmp_path):
    """bos=False (prepare-data --bos off): doc + EOS, recorded in the manifest; bos=True needs a BOS."""
    raw, docs, tok_dir = corpus
    encode, eos, _ = _hf_encode(tok_dir)
    m = prepare({"book": raw / "book"}, tok_dir, tmp_path / "p", SEQ, eval_fraction=0.0, seed=SEED, progress=False,
                bos=False, shuffle_files=False)
    assert m["packing"] == {"bos": False, "document": "doc + EOS", "tokenizer_adds_bos": True}
    stream = [t for rel in m["files"]["book"] for text in docs["book"][rel] for t in encode(text) + [eos]]
    rows, _ = _read_rows(tmp_path / "p" / "train" / "book")
    assert rows.reshape(-1).tolist() == stream[: rows.size]
    from llmshearing.data.tokenizer import Tokenizer

    no_bos = tmp_path / "nobos"
    load_tokenizer(tok_dir)._impl.save_pretrained(no_bos)
    cfg = json.loads((no_bos / "tokenizer_config.json").read_text())
    cfg.pop("bos_token", None)
    (no_bos / "tokenizer_config.json").write_text(json.dumps(cfg))
    (no_bos / "special_tokens_map.json").unlink(missing_ok=True)
    assert isinstance(load_tokenizer(no_bos), Tokenizer) and load_tokenizer(no_bos).bos_id is None
    with pytest.raises(ValueError, match="defines no BOS"):
        prepare({"book": raw / "book"}, no_bos, tmp_path / "q", SEQ, progress=False, bos=True)


def _read_rows(folder) -> tuple[np.ndarray, list[str]]:
    from streaming import StreamingDataset

    from llmshearing.data.shared_memory import release_shared_memory

    ds = StreamingDataset(local=str(folder), batch_size=1, shuffle=False)
    rows = [ds.get_item(i) for i in range(ds.num_samples)]
    release_shared_memory(ds)  # else Streaming holds its shared memory (fds) until exit
    if not rows:
        return np.zeros((0, SEQ), np.uint16), []
    return np.stack([r["tokens"] for r in rows]), [r["domain"] for r in rows]


def _hf_encode(tok_dir):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    return (lambda text: hf(text, add_special_tokens=False)["input_ids"]), hf.eos_token_id, hf.bos_token_id


def test_rows_equal_independent_packing(corpus, prepared):
    """Default packing for a tokenizer with a BOS (like Llama's): BOS + doc + EOS per document."""
    raw, docs, tok_dir = corpus
    out, m = prepared
    encode, eos, bos = _hf_encode(tok_dir)
    assert bos is not None and m["tokenizer"]["bos_id"] == bos and m["packing"]["bos"] is True
    assert m["tokenizer"]["eos_id"] == eos and m["dtype"] == "uint16" and m["seq_len"] == SEQ
    n_eval_docs = n_docs = 0
    for dom in ("cc", "github", "book"):
        assert sorted(m["files"][dom]) == sorted(docs[dom])  # every file used once (notes.md ignored)
        split_docs: dict[str, list[list[int]]] = {"train": [], "eval": []}
        for rel in m["files"][dom]:  # the manifest records the (seeded) file order
            for i, text in enumerate(docs[dom][rel]):
                key = 0 if rel.endswith(".txt") else None
                if key is None:  # byte offset (jsonl) or line number (jsonl.gz) of the document
                    key = i if rel.endswith(".gz") else _byte_offset(raw / dom / rel, i)
                s = "eval" if doc_is_eval(SEED, dom, rel, key, EVAL_FRACTION) else "train"
                split_docs[s].append([bos] + encode(text) + [eos])
        for split, seqs in split_docs.items():
            stream = np.array([t for d in seqs for t in d], np.int64)
            n_rows = len(stream) // SEQ
            rows, doms = _read_rows(out / split / dom)
            assert rows.dtype == np.uint16 and rows.shape == (n_rows, SEQ)
            assert np.array_equal(rows.reshape(-1), stream[: n_rows * SEQ]), (dom, split)
            assert set(doms) <= {dom}
            st = m["splits"][split][dom]
            assert (st["documents"], st["sequences"], st["tokens"], st["dropped_tokens"]) == (
                len(seqs), n_rows, n_rows * SEQ, len(stream) - n_rows * SEQ)
        # no leakage: every document text is in exactly one split
        assert not {tuple(d) for d in split_docs["train"]} & {tuple(d) for d in split_docs["eval"]}
        n_eval_docs += len(split_docs["eval"])
        n_docs += len(split_docs["eval"]) + len(split_docs["train"])
    # the seeded split is a fair coin with p=0.2: binomial z-test, |z| < 4
    z = (n_eval_docs - EVAL_FRACTION * n_docs) / np.sqrt(n_docs * EVAL_FRACTION * (1 - EVAL_FRACTION))
    assert abs(z) < 4, (n_eval_docs, n_docs)


def _byte_offset(path, doc_index: int) -> int:
    """Offset of the doc_index-th non-blank line (computed independently of the library)."""
    pos, seen = 0, 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                if seen == doc_index:
                    return pos
                seen += 1
            pos += len(line)
    raise IndexError(doc_index)


def test_decoded_rows_are_source_text(corpus, prepared):
    raw, docs, tok_dir = corpus
    out, m = prepared
    tok = load_tokenizer(tok_dir)
    rows, _ = _read_rows(out / "train" / "book")
    pieces = tok.decode(rows.reshape(-1).tolist()).split("</s>")
    texts = {t for f in docs["book"].values() for t in f}
    assert len(pieces) > 2 and all(p.startswith("<s>") for p in pieces[:-1])  # BOS + doc + EOS
    assert all(p.removeprefix("<s>") in texts for p in pieces[:-1])  # last piece is cut by packing


def test_eval_merge_holds_every_domain(prepared):
    out, m = prepared
    merged, doms = _read_rows(out / "eval_merge")
    parts = [_read_rows(out / "eval" / d)[0] for d in m["domains"]]
    assert np.array_equal(merged, np.concatenate(parts))
    assert doms == [d for d, p in zip(m["domains"], parts) for _ in range(len(p))]
    assert m["splits"]["eval_merge"]["sequences"] == len(merged)


def test_deterministic_across_workers_and_chunking(corpus, prepared, tmp_path):
    raw, _, tok_dir = corpus
    out, m = prepared
    m2 = prepare(_sources(raw), tok_dir, tmp_path, SEQ, eval_fraction=EVAL_FRACTION, seed=SEED, workers=1,
                 progress=False)
    assert m2["splits"] == m["splits"] and m2["files"] == m["files"]
    for split in ("train", "eval"):
        for d in m["domains"]:
            assert np.array_equal(_read_rows(out / split / d)[0], _read_rows(tmp_path / split / d)[0])


def test_budgets_take_a_prefix_in_file_order(corpus, prepared, tmp_path):
    raw, _, tok_dir = corpus
    out, m = prepared
    b = prepare(_sources(raw), tok_dir, tmp_path, SEQ, eval_fraction=EVAL_FRACTION, seed=SEED, workers=2,
                train_tokens={"cc": 5 * SEQ + 7, "book": "2e2"}, eval_sequences=2, chunk_bytes=700, progress=False)
    assert b["splits"]["train"]["cc"]["sequences"] == 5
    assert b["splits"]["train"]["book"]["sequences"] == 200 // SEQ
    assert b["splits"]["train"]["github"] == m["splits"]["train"]["github"]  # no budget: everything
    for d in b["domains"]:
        assert b["splits"]["eval"][d]["sequences"] == 2
        full = _read_rows(out / "eval" / d)[0]
        assert np.array_equal(_read_rows(tmp_path / "eval" / d)[0], full[:2])
    full_cc = _read_rows(out / "train" / "cc")[0]
    assert np.array_equal(_read_rows(tmp_path / "train" / "cc")[0], full_cc[:5])
    st = b["splits"]["train"]["cc"]
    assert st["documents"] < m["splits"]["train"]["cc"]["documents"] and st["dropped_tokens"] >= 0


def test_manifest_refuses_mismatch(corpus, prepared, tmp_path):
    from llmshearing.data.dynamic import build_train_dataloader

    raw, docs, tok_dir = corpus
    out, m = prepared
    assert check_manifest(out, seq_len=SEQ, vocab_size=300, tokenizer=tok_dir, domains=["cc"], split="train")
    with pytest.raises(ValueError, match="seq_len mismatch.*seq_len=32.*expects 64"):
        check_manifest(out, seq_len=64)
    with pytest.raises(ValueError, match="vocab_size mismatch"):
        check_manifest(out, vocab_size=32000)
    assert check_manifest(out, vocab_size=320, allow_padded_vocab=True)
    with pytest.raises(ValueError, match="vocab_size mismatch"):
        check_manifest(out, vocab_size=200, allow_padded_vocab=True)
    other = train_tokenizer(["something else entirely"] * 10, 280, tmp_path / "other_tok")
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        check_manifest(out, tokenizer=other)
    with pytest.raises(ValueError, match="domain mismatch.*wiki"):
        check_manifest(out, domains=["cc", "wiki"], split="train")
    with pytest.raises(ValueError, match="no manifest.json"):
        check_manifest(tmp_path)
    with pytest.raises(ValueError, match="seq_len mismatch"):  # training refuses it too
        build_train_dataloader(out, ["cc", "github"], [0.5, 0.5], 4, 64, seed=0)
    dl = build_train_dataloader(out, ["cc", "github", "book"], [0.4, 0.4, 0.2], 4, SEQ, seed=0, vocab_size=300)
    assert next(iter(dl))["input_ids"].shape == (4, SEQ)
    dl.dataset.close()


def test_input_errors(corpus, tmp_path):
    raw, _, tok_dir = corpus
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="domain 'x': folder .* holds no"):
        prepare({"x": tmp_path / "empty"}, tok_dir, tmp_path / "o1", SEQ, progress=False)
    with pytest.raises(FileNotFoundError, match="domain 'x'.*does not exist"):
        prepare({"x": tmp_path / "missing"}, tok_dir, tmp_path / "o2", SEQ, progress=False)
    with pytest.raises(ValueError, match="pattern .* matches no files"):
        prepare({"x": str(tmp_path / "*.jsonl")}, tok_dir, tmp_path / "o3", SEQ, progress=False)
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        prepare({"cc": raw / "cc"}, tok_dir, tmp_path / "o4", 1, progress=False)
    with pytest.raises(ValueError, match="no text field 'content'.*keys: meta, text"):
        prepare({"cc": raw / "cc"}, tok_dir, tmp_path / "o5", SEQ, text_field="content", progress=False)
    with pytest.raises(ValueError, match="smaller than one sequence"):
        prepare({"cc": raw / "cc"}, tok_dir, tmp_path / "o6", SEQ, train_tokens=SEQ - 1, progress=False)
    with pytest.raises(ValueError, match="no train sequence"):
        prepare({"cc": raw / "cc"}, tok_dir, tmp_path / "o7", 100_000, progress=False)
    prepare({"book": raw / "book"}, tok_dir, tmp_path / "o8", SEQ, progress=False)
    with pytest.raises(ValueError, match="already holds prepared data"):
        prepare({"book": raw / "book"}, tok_dir, tmp_path / "o8", SEQ, progress=False)
    prepare({"book": raw / "book"}, tok_dir, tmp_path / "o8", SEQ, progress=False, overwrite=True)


def test_token_dtype_from_vocab():
    assert token_dtype(32000) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(128256) == np.uint32


def test_sentencepiece_model(corpus, tmp_path):
    import sentencepiece as spm

    raw, docs, _ = corpus
    texts = [t for f in docs["github"].values() for t in f]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=60, minloglevel=2)
    tok = load_tokenizer(tmp_path / "sp.model")
    assert tok.kind == "sentencepiece" and tok.vocab_size == 60 and tok.eos_id == 2
    ids = tok.encode("the of and to")
    assert tok.eos_id not in ids and 1 not in ids  # no BOS/EOS added
    assert tok.decode(ids) == "the of and to"
    m = prepare({"github": raw / "github"}, tmp_path / "sp.model", tmp_path / "out", 16, eval_fraction=0.0,
                progress=False)
    assert m["tokenizer"]["kind"] == "sentencepiece" and "eval" not in m["splits"]
    rows, _ = _read_rows(tmp_path / "out" / "train" / "github")
    assert rows.shape[0] == m["splits"]["train"]["github"]["sequences"] > 0 and rows.max() < 60


def test_cli_prepare_data(corpus, tmp_path, capsys):
    raw, _, tok_dir = corpus
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    (tmp_path / "domains.yaml").write_text(f"domains:\n  github: {raw / 'github'}\n")
    args = parser.parse_args([
        "prepare-data", "--domain", f"cc={raw / 'cc'}", "--domains-file", str(tmp_path / "domains.yaml"),
        "--tokenizer", str(tok_dir), "--out", str(tmp_path / "o"), "--seq-len", "16", "--workers", "1",
        "--train-tokens", "cc=160", "--eval-sequences", "3", "--quiet"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "TOTAL" in text and "github" in text
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["domains"] == ["github", "cc"] and m["splits"]["train"]["cc"]["sequences"] == 10
    assert format_summary(m).splitlines()[0].split() == ["domain", "split", "documents", "tokens", "sequences",
                                                        "dropped"]


def test_manifest_refuses_an_empty_split(tmp_path):
    """A domain whose split holds no sequences is refused up front (Streaming would fail deep in a loader)."""
    import json as _json

    from _tiny_data import make_tiny_data

    root = make_tiny_data(tmp_path, docs_per_domain=40)
    check_manifest(root, domains=["code"], split="eval")
    mf = root / "manifest.json"
    m = _json.loads(mf.read_text())
    m["splits"]["eval"]["code"]["sequences"] = 0
    mf.write_text(_json.dumps(m))
    with pytest.raises(ValueError, match=r"split 'eval' .* no sequences for \['code'\]"):
        check_manifest(root, domains=["code", "legal"], split="eval")
