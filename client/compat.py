"""A drop-in for simpletransformers' RepresentationModel that asks a bertstream server.

    # from simpletransformers.language_representation import RepresentationModel
    from . import RepresentationModel
    model = RepresentationModel("bert", "bert-base-uncased", use_cuda=False)
    vectors = model.encode_sentences(sentences, combine_strategy="mean")

The server to ask: the `target` argument, else the BERTSTREAM_TARGET environment variable, else
127.0.0.1:50051. The server's model is what answers: model_type and model_name are kept for
compatibility (and checked against nothing), use_cuda and cuda_device are the server's business.
"""

from __future__ import annotations

import os

from .core import pad_tokens
from .sync import Client

DEFAULT_TARGET = "127.0.0.1:50051"


class RepresentationModel:
    def __init__(self, model_type: str, model_name: str, args=None, use_cuda: bool = True,
                 cuda_device: int = -1, target: str | None = None, **kwargs):
        self.model_type, self.model_name, self.args = model_type, model_name, args or {}
        self.target = target or os.environ.get("BERTSTREAM_TARGET", DEFAULT_TARGET)
        self.client = Client(self.target, **kwargs)

    def encode_sentences(self, text_list, combine_strategy=None, batch_size: int = 32):
        """simpletransformers' shapes, masked semantics (see Client.encode_sentences):
        None -> (n, L, hidden) with zeros after each text's tokens, L the longest text;
        "mean"/"max" -> (n, hidden); "concat" -> (n, L * hidden); int -> (n, hidden)."""
        result = self.client.encode_sentences(text_list, combine_strategy, batch_size)
        return pad_tokens(result) if combine_strategy is None else result
