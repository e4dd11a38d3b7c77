"""The bundled bertstream client.

    from bertstream.client import Client
    with Client("127.0.0.1:50051") as client:
        vectors = client.embed(["first text", "second text"])          # (2, 384) float32

Client (blocking) and AsyncClient (asyncio) share their methods: embed, embed_tokens, stream,
tokenize, info, list_models, encode_sentences; on other model kinds, rerank, classify and
embed_sparse. RepresentationModel is a drop-in for simpletransformers'.
"""

from .aio import AsyncClient
from .compat import RepresentationModel
from .core import (Classified, EmbedStreamError, Int8Embeddings, Usage, build_request,
                   decode_tensor, make_channel)
from .sync import Client

__all__ = ["Client", "AsyncClient", "RepresentationModel", "Int8Embeddings", "Classified", "Usage",
           "EmbedStreamError", "decode_tensor", "build_request", "make_channel"]
