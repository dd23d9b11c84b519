"""Training data: corpora on disk (`corpus`) and their token streams packed into batches (`packing`)."""

from .corpus import (Document, corpus_fingerprint, document_name, read_documents, split_documents,
                     stdlib_documents)
from .packing import (BatchSampler, PackedDataset, cached_token_stream, load_or_train_tokenizer,
                      tokenize_documents, tokenizer_fingerprint)

__all__ = ["Document", "corpus_fingerprint", "document_name", "read_documents", "split_documents",
           "stdlib_documents", "BatchSampler", "PackedDataset", "cached_token_stream", "load_or_train_tokenizer",
           "tokenize_documents", "tokenizer_fingerprint"]
