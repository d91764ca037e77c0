"""Question answering over long documents by retrieval: split documents into passages, embed
them with all-MiniLM-L6-v2 on qkv's encoder, and find the passages (and the sentence in each)
closest to a question by exact cosine similarity.

    from qkv.retrieval import build_index, load_index
    index = build_index(["docs/"], "docs-index")   # or index_texts({"name.md": text})
    for hit in load_index("docs-index").search("how do I install it?", k=3):
        print(hit.rank, round(hit.score, 3), hit.passage.file, hit.sentence_text)

The `qkv index` and `qkv ask` commands are thin shells over these functions.
"""

from qkv.retrieval.build import build_index, index_texts
from qkv.retrieval.index import (
    BuildReport,
    Index,
    IndexFormatError,
    QueryTruncatedWarning,
    load_index,
)
from qkv.retrieval.passages import KINDS, Passage, kind_of, split_text
from qkv.retrieval.search import Hit, sentences

__all__ = ["KINDS", "BuildReport", "Hit", "Index", "IndexFormatError", "Passage",
           "QueryTruncatedWarning", "build_index", "index_texts", "kind_of", "load_index",
           "sentences", "split_text"]
