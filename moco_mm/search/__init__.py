"""From a trained run to search: export, the embedding API, corpora, indexes, evaluation.

    export.py    a checkpoint -> a self-contained export (safetensors + JSON, optional ONNX)
    encoder.py   Encoder.from_export(dir).encode_images / encode_texts
    corpus.py    shard sets, image folders and tables -> items to embed
    index.py     FAISS indexes: build, load, search
    embed.py     distributed, resumable embedding of shards into parts (moco-mm embed, torchrun)
    streaming.py an index from those parts within a memory budget (flat / HNSW / IVF-PQ), recall report
    evaluate.py  retrieval metrics of an export on a held-out set; COCO 5k/1k, Flickr30k 1k tables
    zeroshot.py  zero-shot classification of an export (moco-mm eval-zeroshot; CLIP's prompt ensemble)
    serve.py     the search service: create_app(index_dir, export) (FastAPI), `moco-mm serve`;
                 search.html is its page (imported only when serving: FastAPI is the [serve] extra)

Imports: the base modules, `moco_mm.model`, `moco_mm.data`, `moco_mm.train` (to read its
checkpoints) and itself; never plan, bench or cli. tests/test_layout.py checks this.
"""

from moco_mm.search.corpus import Item, corpus_size, iter_items
from moco_mm.search.embed import Embeddings, embed_corpus
from moco_mm.search.encoder import Encoder, SearchError, load_image
from moco_mm.search.evaluate import RetrievalReport, evaluate_protocol, evaluate_retrieval
from moco_mm.search.export import ExportError, ExportSpec, export_encoders, rebuild_towers, verify_export
from moco_mm.search.index import Hit, IndexParams, IndexReport, SearchIndex, build_index, make_faiss_index
from moco_mm.search.streaming import build_index_from_parts, plan_index

__all__ = [
    "Encoder", "SearchError", "load_image", "Item", "corpus_size", "iter_items", "evaluate_retrieval",
    "evaluate_protocol", "RetrievalReport",
    "ExportError", "ExportSpec", "export_encoders", "rebuild_towers", "verify_export",
    "Hit", "IndexParams", "IndexReport", "SearchIndex", "build_index", "make_faiss_index",
    "Embeddings", "embed_corpus", "build_index_from_parts", "plan_index",
]
