"""bertstream.ext kernels against plain numpy references, on hypothesis-drawn shapes and values."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from bertstream import ext

INPUT_DTYPES = ("float32", "float16", "bfloat16")
THREADS = (1, 2)
POISON = np.float32(np.nan)  # an unwritten output element would stay NaN and fail the comparison


# ---------------------------------------------------------------- references (plain numpy)

def to_float32(hidden, dtype):
    """The float32 values a kernel should see for an input handed over as `dtype`."""
    if dtype == "bfloat16":
        return ext.bfloat16_to_float32(hidden)
    return hidden.astype(np.float32)


def combined_tokens(layers32, length, b, combine):
    tokens = [layer[b, :length] for layer in layers32]
    if combine == "mean":
        return np.mean(np.stack(tokens), axis=0, dtype=np.float32)
    return np.concatenate(tokens, axis=1)


def ref_pool(layers32, lengths, mode, combine="concat", starts=None):
    """Per row: tokens starts[b]..lengths[b]-1, layers combined, every mode side by side (per
    layer block when concatenating; pooling commutes with per-token concatenation)."""
    modes = ext.pool_modes(mode)
    starts = np.zeros(len(lengths), int) if starts is None else starts
    rows = []
    for b, length in enumerate(lengths):
        tokens = combined_tokens(layers32, length, b, combine).astype(np.float64)
        blocks = np.split(tokens, len(layers32), axis=1) if combine == "concat" else [tokens]
        rows.append(np.concatenate([ref_pool_tokens(block, m, starts[b])
                                    for block in blocks for m in modes]))
    return np.array(rows, dtype=np.float32)


def ref_pool_tokens(tokens, mode, start=0):
    """One pooling mode over tokens[start:], positions counted from the row's first token."""
    kept = tokens[start:]
    positions = np.arange(start, len(tokens), dtype=np.float64) + 1
    return {
        "mean": lambda: kept.mean(0),
        "max": lambda: kept.max(0),
        "cls": lambda: kept[0],
        "mean_sqrt_len": lambda: kept.sum(0) / np.sqrt(len(kept)),
        "weightedmean": lambda: (kept * positions[:, None]).sum(0) / positions.sum(),
        "lasttoken": lambda: kept[-1],
    }[mode]()


def make_hidden(rng, shape, dtype):
    values = rng.standard_normal(shape, dtype=np.float32) * 3
    if dtype == "bfloat16":
        return ext.pack_bfloat16(values.reshape(-1, shape[-1])).reshape(shape)
    return values.astype(dtype)


def padded(hidden, lengths, value):
    """Fill padding positions with `value`: a kernel that reads them changes its answer."""
    hidden = hidden.copy()
    for b, length in enumerate(lengths):
        hidden[b, length:] = value
    return hidden


def poisoned(shape):
    return np.full(shape, POISON, dtype=np.float32)


TOL = {"float32": 2e-5, "float16": 2e-5, "bfloat16": 2e-5}  # all accumulate in float32

shapes = st.tuples(st.integers(1, 6), st.integers(1, 40), st.integers(1, 70))


@st.composite
def pooling_cases(draw):
    batch, seq, hidden = draw(shapes)
    lengths = draw(st.one_of(
        st.lists(st.integers(1, seq), min_size=batch, max_size=batch),
        st.just([seq] * batch),   # all lengths equal (no padding at all)
        st.just([1] * batch),     # one token each
    ))
    return (batch, seq, hidden), np.array(lengths), draw(st.integers(0, 2**32 - 1))


# Single modes, the mean_max alias, and several modes concatenated (sentence-transformers' order).
MODES = [*ext.POOLING_MODES, "mean_max", ("cls", "mean"), ("max", "mean_sqrt_len", "weightedmean"),
         ("lasttoken", "mean", "cls", "max")]


# ---------------------------------------------------------------- pooling

@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=40, deadline=None)
@given(case=pooling_cases(), n_threads=st.sampled_from(THREADS), data=st.data())
def test_pool_matches_reference(dtype, mode, case, n_threads, data):
    shape, lengths, seed = case
    rng = np.random.default_rng(seed)
    pad_value = np.uint16(0x7FC0) if dtype == "bfloat16" else np.nan  # NaN padding
    hidden = padded(make_hidden(rng, shape, dtype), lengths, pad_value)
    # Half the cases leave a prompt out: each row's first pooled token drawn in 0..length-1.
    starts = data.draw(st.one_of(st.none(), st.tuples(*[st.integers(0, n - 1) for n in lengths])))
    starts = None if starts is None else np.array(starts)
    width = shape[2] * len(ext.pool_modes(mode))
    out = poisoned((shape[0], width))
    result = ext.pool(hidden, lengths, mode, out=out, n_threads=n_threads, starts=starts)
    assert result is out
    expected = ref_pool([to_float32(hidden, dtype)], lengths, mode, starts=starts)
    np.testing.assert_allclose(result, expected, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("modes", [("mean",), ("cls",), ("max",), ("lasttoken",),
                                   ("mean_sqrt_len",), ("weightedmean",),
                                   ("cls", "max", "mean", "mean_sqrt_len", "weightedmean",
                                    "lasttoken")])
@pytest.mark.parametrize("prompt_length", [0, 2])
def test_pool_matches_sentence_transformers_pooling(modes, prompt_length):
    """The kernels against sentence-transformers' own Pooling module, prompt left out or not."""
    import torch
    from sentence_transformers.sentence_transformer.modules import Pooling

    st_names = {"mean_sqrt_len": "mean_sqrt_len_tokens"}
    rng = np.random.default_rng(7)
    lengths = np.array([9, 3, 6, 4])
    hidden = padded(make_hidden(rng, (4, 9, 16), "float32"), lengths, 0.0)
    mask = (np.arange(9)[None, :] < lengths[:, None]).astype(np.int64)
    module = Pooling(16, pooling_mode=tuple(st_names.get(m, m) for m in modes),
                     include_prompt=not prompt_length)
    features = {"token_embeddings": torch.from_numpy(hidden),
                "attention_mask": torch.from_numpy(mask), "prompt_length": prompt_length}
    expected = module(features)["sentence_embedding"].numpy()
    starts = np.full(4, prompt_length)
    np.testing.assert_allclose(ext.pool(hidden, lengths, modes, starts=starts), expected,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("combine", ext.LAYER_COMBINES)
@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=15, deadline=None)
@given(case=pooling_cases(), n_layers=st.integers(1, 4))
def test_pool_combines_layers(dtype, combine, mode, case, n_layers):
    shape, lengths, seed = case
    rng = np.random.default_rng(seed)
    layers = [make_hidden(rng, shape, dtype) for _ in range(n_layers)]
    result = ext.pool(layers, lengths, mode, layer_combine=combine)
    expected = ref_pool([to_float32(layer, dtype) for layer in layers], lengths, mode, combine)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)


def test_named_wrappers_are_the_pool_modes():
    rng = np.random.default_rng(0)
    hidden = make_hidden(rng, (3, 7, 5), "float32")
    lengths = np.array([7, 2, 4])
    for fn, mode in [(ext.masked_mean, "mean"), (ext.masked_max, "max"), (ext.cls_pool, "cls"),
                     (ext.mean_max, "mean_max")]:
        np.testing.assert_array_equal(fn(hidden, lengths), ext.pool(hidden, lengths, mode))


@pytest.mark.parametrize("shape", [(1, 512, 1024), (4, 512, 768), (2, 3, 1024)])
def test_large_shapes(shape):
    """Long sequences and wide hidden sizes, including batch 1."""
    rng = np.random.default_rng(1)
    hidden = make_hidden(rng, shape, "float32")
    lengths = rng.integers(1, shape[1] + 1, size=shape[0])
    lengths[0] = shape[1]
    for mode in MODES:
        expected = ref_pool([hidden], lengths, mode)
        np.testing.assert_allclose(ext.pool(hidden, lengths, mode), expected, rtol=1e-5, atol=1e-5)


def test_readonly_inputs_are_accepted():
    rng = np.random.default_rng(2)
    hidden = make_hidden(rng, (2, 4, 3), "float32")
    hidden.flags.writeable = False
    lengths = np.array([4, 1])
    lengths.flags.writeable = False
    np.testing.assert_allclose(ext.masked_mean(hidden, lengths), ref_pool([hidden], lengths, "mean"),
                               rtol=1e-6)
    assert ext.gather_tokens(hidden, lengths).shape == (5, 3)


def test_nan_and_inf_follow_ieee_over_real_tokens_only():
    hidden = np.zeros((3, 3, 2), dtype=np.float32)
    hidden[0, :, 0] = [1.0, np.nan, 2.0]      # NaN in a real token: mean and max are NaN
    hidden[1, :, 0] = [np.inf, 1.0, np.nan]   # +inf real, NaN only in padding (length 2)
    hidden[2, :, 0] = [np.inf, -np.inf, 0.0]  # +inf and -inf in one mean: NaN; max: +inf
    lengths = np.array([3, 2, 3])
    mean, maxed = ext.masked_mean(hidden, lengths), ext.masked_max(hidden, lengths)
    assert np.isnan(mean[0, 0]) and np.isnan(maxed[0, 0])
    assert mean[1, 0] == np.inf and maxed[1, 0] == np.inf
    assert np.isnan(mean[2, 0]) and maxed[2, 0] == np.inf
    assert np.all(mean[:, 1] == 0) and np.all(maxed[:, 1] == 0)  # other columns untouched by it
    # NaN as the first token sticks too (max does not skip it).
    first = np.array([[[np.nan], [5.0]]], dtype=np.float32)
    assert np.isnan(ext.masked_max(first, [2])[0, 0])


# ---------------------------------------------------------------- pooling on the device (torch)

def as_torch(hidden, dtype):
    """A kernel input as the tensor a forward pass would have left on the device."""
    import torch

    if dtype == "bfloat16":  # the kernels take bfloat16 as its bits
        return torch.from_numpy(hidden.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(hidden.copy())


@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("combine", ext.LAYER_COMBINES)
@pytest.mark.parametrize("mode", MODES)
@settings(max_examples=15, deadline=None)
@given(case=pooling_cases(), n_layers=st.integers(1, 3), data=st.data())
def test_device_pooling_matches_reference(dtype, combine, mode, case, n_layers, data):
    """server/device_pooling.py (a GPU's pooling, run here on CPU tensors) against the kernels'
    reference: NaN in the padding, a prompt left out of some rows, some rows chosen."""
    from bertstream.server import device_pooling

    shape, lengths, seed = case
    rng = np.random.default_rng(seed)
    pad_value = np.uint16(0x7FC0) if dtype == "bfloat16" else np.nan
    layers = [padded(make_hidden(rng, shape, dtype), lengths, pad_value) for _ in range(n_layers)]
    rows = np.array(sorted(data.draw(st.sets(st.integers(0, shape[0] - 1), min_size=1))))
    starts = data.draw(st.one_of(st.none(), st.tuples(*[st.integers(0, lengths[r] - 1)
                                                        for r in rows])))
    starts = None if starts is None else np.array(starts)
    result = device_pooling.pool([as_torch(layer, dtype) for layer in layers], lengths[rows],
                                 rows, ext.pool_modes(mode), combine == "mean", starts)
    expected = ref_pool([to_float32(layer, dtype)[rows] for layer in layers], lengths[rows],
                        mode, combine, starts)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)


def test_device_pooling_equals_the_kernels_through_the_engine(engine, corpus):
    """Engine.pool with pool_on_device (a GPU's setting) against the kernels, on a forward pass
    of corpus texts: every pooling option a request can ask, a prompt left out, a cut to fewer
    dimensions, and a few rows of the batch."""
    texts = list(corpus[:24])
    cases = [engine.options(), engine.options("max", (0, -1)),
             engine.options("mean", (1, 3, -1), "mean", normalize=False),
             engine.options("mean_max"), engine.options("weightedmean"), engine.options("cls"),
             engine.options("lasttoken"), engine.options("mean_sqrt_len", (2,)),
             engine.options(prompt="query: ", dimensions=128)]
    for options in cases:
        hidden, lengths = engine.forward(engine.tokenize(texts, prompt=options.prompt).ids)
        for rows in (np.arange(len(texts)), np.array([0, 5, 6, 23])):
            pooled, setting = {}, engine.pool_on_device  # the device's own (a GPU's: True)
            try:
                for on_device in (False, True):
                    engine.pool_on_device = on_device
                    pooled[on_device] = engine.pool(hidden, lengths, rows, options)
            finally:
                engine.pool_on_device = setting
            np.testing.assert_allclose(pooled[True], pooled[False], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- token gathering

@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("combine", ext.LAYER_COMBINES)
@settings(max_examples=25, deadline=None)
@given(case=pooling_cases(), n_layers=st.integers(1, 3), n_threads=st.sampled_from(THREADS))
def test_gather_tokens(dtype, combine, case, n_layers, n_threads):
    shape, lengths, seed = case
    rng = np.random.default_rng(seed)
    layers = [make_hidden(rng, shape, dtype) for _ in range(n_layers)]
    layers32 = [to_float32(layer, dtype) for layer in layers]
    width = shape[2] * (1 if combine == "mean" else n_layers)
    out = poisoned((int(lengths.sum()), width))
    result = ext.gather_tokens(layers, lengths, combine, out=out, n_threads=n_threads)
    expected = np.concatenate([combined_tokens(layers32, n, b, combine) for b, n in enumerate(lengths)])
    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- normalisation and packing

vectors = hnp.arrays(np.float32, st.tuples(st.integers(1, 8), st.integers(1, 70)),
                     elements=st.floats(-1e4, 1e4, width=32))


@settings(max_examples=60, deadline=None)
@given(x=vectors, n_threads=st.sampled_from(THREADS))
def test_l2_normalize(x, n_threads):
    expected = x.astype(np.float64)
    norms = np.linalg.norm(expected, axis=1, keepdims=True)
    expected = np.where(norms > 0, expected / np.where(norms > 0, norms, 1), 0)
    result = ext.l2_normalize(x.copy(), n_threads=n_threads)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)


def test_l2_normalize_zero_row_stays_zero():
    x = np.zeros((2, 4), dtype=np.float32)
    x[1] = [3, 4, 0, 0]
    np.testing.assert_array_equal(ext.l2_normalize(x), np.array([[0, 0, 0, 0], [0.6, 0.8, 0, 0]], np.float32))


@settings(max_examples=60, deadline=None)
@given(x=hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 40)),
                    elements=st.floats(width=32, allow_nan=True, allow_infinity=True)))
def test_pack_float16_and_bfloat16(x):
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(ext.pack_float16(x), x.astype(np.float16))
    bits = ext.pack_bfloat16(x)
    assert bits.dtype == np.uint16 and bits.shape == x.shape
    decoded = ext.bfloat16_to_float32(bits)
    assert np.array_equal(np.isnan(decoded), np.isnan(x))
    # Rounding to nearest overflows to inf only above the largest bfloat16 (0x7F7F).
    overflowed = np.isfinite(x) & np.isinf(decoded)
    assert np.all(np.abs(x[overflowed]) > ext.bfloat16_to_float32(np.array([0x7F7F])))
    finite = np.isfinite(x) & ~overflowed
    # Round to nearest: the error is at most half a bfloat16 ulp (8 mantissa bits).
    err = np.abs(decoded[finite].astype(np.float64) - x[finite])
    assert np.all(err <= np.abs(x[finite]) * 2.0**-8 + 1e-45 * 2**16)
    np.testing.assert_array_equal(decoded[np.isinf(x)], x[np.isinf(x)])


def test_bfloat16_rounds_to_nearest_even():
    # 1 + 2^-8 lies exactly halfway between bfloat16 1.0 and 1.0078125: ties go to even (1.0);
    # 1 + 3*2^-8 lies halfway between 1.0078125 and 1.015625: ties go to even (1.015625).
    x = np.array([[1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20]], dtype=np.float32)
    decoded = ext.bfloat16_to_float32(ext.pack_bfloat16(x))
    np.testing.assert_array_equal(decoded, [[1.0, 1.015625, 1.0078125]])


@settings(max_examples=80, deadline=None)
@given(x=vectors, n_threads=st.sampled_from(THREADS))
def test_pack_int8(x, n_threads):
    q, scales = ext.pack_int8(x, n_threads=n_threads)
    peak = np.abs(x).max(axis=1)
    np.testing.assert_allclose(scales, peak / 127, rtol=1e-6)
    expected = np.where(peak[:, None] > 0, np.rint(x.astype(np.float64) * 127 / np.where(
        peak > 0, peak, 1)[:, None]), 0)
    assert np.abs(q.astype(np.int64) - expected).max() <= 1  # float32 vs float64 rounding at .5
    assert np.all(np.abs(q.astype(np.float32) * scales[:, None] - x) <= scales[:, None] * 0.5 + 1e-6)


def test_pack_int8_non_finite():
    x = np.array([[np.nan, np.inf, -np.inf, 2.0, -1.0], [0, 0, 0, 0, 0],
                  [np.inf, np.nan, 0, 0, 0]], dtype=np.float32)
    q, scales = ext.pack_int8(x)
    np.testing.assert_array_equal(q, [[0, 127, -127, 127, -64], [0] * 5, [127, 0, 0, 0, 0]])
    np.testing.assert_array_equal(scales, np.array([2 / 127, 0, 0], dtype=np.float32))


@settings(max_examples=80, deadline=None)
@given(x=hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 70)),
                    elements=st.floats(width=32, allow_nan=True, allow_infinity=True)),
       n_threads=st.sampled_from(THREADS))
def test_pack_binary(x, n_threads):
    packed = ext.pack_binary(x, n_threads=n_threads)
    np.testing.assert_array_equal(packed, np.packbits(x > 0, axis=1))
    np.testing.assert_array_equal(np.unpackbits(packed, axis=1, count=x.shape[1]), x > 0)


# ---------------------------------------------------------------- validation

def _hidden():
    return np.zeros((2, 4, 3), dtype=np.float32)


@pytest.mark.parametrize("call, message", [
    (lambda: ext.masked_mean(np.zeros((2, 4)), [1, 1]), "expected shape (batch, seq, hidden)"),
    (lambda: ext.masked_mean(np.zeros((2, 4, 3)), [1, 1]), "dtype must be float32"),
    (lambda: ext.masked_mean(np.zeros((2, 4, 6), np.float32)[:, :, ::2], [1, 1]), "C-contiguous"),
    (lambda: ext.masked_mean([1.0], [1]), "expected a numpy array"),
    (lambda: ext.masked_mean([], [1]), "at least one layer"),
    (lambda: ext.masked_mean(np.zeros((0, 4, 3), np.float32), []), "empty shape"),
    (lambda: ext.pool([_hidden(), np.zeros((2, 5, 3), np.float32)], [1, 1]), "must match hidden[0]"),
    (lambda: ext.masked_mean(_hidden(), [1, 1, 1]), "lengths: expected shape (2,)"),
    (lambda: ext.masked_mean(_hidden(), [1.0, 1.0]), "lengths: must be integers"),
    (lambda: ext.masked_mean(_hidden(), [1, 0]), "lengths[1] = 0 is outside 1..4"),
    (lambda: ext.masked_max(_hidden(), [5, 1]), "lengths[0] = 5 is outside 1..4"),
    (lambda: ext.masked_mean(_hidden(), [1, 1], out=np.zeros((2, 4), np.float32)), "out: expected"),
    (lambda: ext.masked_mean(_hidden(), [1, 1], out=np.zeros((2, 3))), "out: expected"),
    (lambda: ext.masked_mean(_hidden(), [1, 1], out=np.zeros((3, 2), np.float32).T), "C-contiguous"),
    (lambda: ext.pool(_hidden(), [1, 1], "median"), "mode must be one of"),
    (lambda: ext.pool(_hidden(), [1, 1], ()), "mode must be one of"),
    (lambda: ext.pool(_hidden(), [1, 1], ("mean", "sum")), "mode must be one of"),
    (lambda: ext.pool(_hidden(), [2, 3], starts=[0, 3]), "starts[1] = 3 is outside 0..2"),
    (lambda: ext.pool(_hidden(), [2, 3], starts=[-1, 0]), "starts[0] = -1 is outside"),
    (lambda: ext.pool(_hidden(), [2, 3], starts=[0]), "starts: expected shape (2,)"),
    (lambda: ext.pool(_hidden(), [1, 1], layer_combine="sum"), "layer_combine must be one of"),
    (lambda: ext.masked_mean(_hidden(), [1, 1], n_threads=0), "n_threads must be >= 1"),
    (lambda: ext.l2_normalize(np.zeros((2, 2))), "expected a 2-d float32 array"),
    (lambda: ext.l2_normalize(np.zeros((4, 2), np.float32)[::2]), "C-contiguous"),
    (lambda: ext.pack_int8(np.zeros(3, np.float32)), "expected a 2-d float32 array"),
    (lambda: ext.pack_binary([[1.0]]), "expected a 2-d float32 array"),
])
def test_value_errors_name_the_problem(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)


def test_l2_normalize_refuses_readonly():
    x = np.ones((1, 2), np.float32)
    x.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        ext.l2_normalize(x)


# ---------------------------------------------------------------- SPLADE

def ref_splade(logits32, lengths, pooling, activation):
    """log1p(relu(x)) (twice for log1p_relu) over each row's real tokens, max or sum."""
    rows = []
    for b, length in enumerate(lengths):
        x = np.log1p(np.maximum(logits32[b, :length].astype(np.float64), 0))
        if activation == "log1p_relu":
            x = np.log1p(x)
        rows.append(x.max(0) if pooling == "max" else x.sum(0))
    return np.array(rows, dtype=np.float32)


@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("pooling", ext.SPLADE_POOLINGS)
@pytest.mark.parametrize("activation", ("relu", "log1p_relu"))
@settings(max_examples=30, deadline=None)
@given(case=pooling_cases(), n_threads=st.sampled_from(THREADS))
def test_splade_matches_reference(dtype, pooling, activation, case, n_threads):
    shape, lengths, seed = case
    rng = np.random.default_rng(seed)
    pad_value = np.uint16(0x7FC0) if dtype == "bfloat16" else np.nan  # NaN padding: never read
    logits = padded(make_hidden(rng, shape, dtype), lengths, pad_value)
    out = poisoned((shape[0], shape[2]))
    result = ext.splade(logits, lengths, pooling, activation, out=out, n_threads=n_threads)
    assert result is out
    expected = ref_splade(to_float32(logits, dtype), lengths, pooling, activation)
    np.testing.assert_allclose(result, expected, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", INPUT_DTYPES)
@pytest.mark.parametrize("pooling", ext.SPLADE_POOLINGS)
@pytest.mark.parametrize("activation", ("relu", "log1p_relu"))
@settings(max_examples=15, deadline=None)
@given(case=pooling_cases(), chunk=st.sampled_from([1, 100, 1 << 26]), data=st.data())
def test_device_splade_matches_reference(dtype, pooling, activation, case, chunk, data):
    """server/device_pooling.splade (a GPU's, on CPU tensors here) against the kernels'
    reference: NaN padding, some rows chosen, the rows taken a few at a time or all at once."""
    from bertstream.server import device_pooling

    shape, lengths, seed = case
    rng = np.random.default_rng(seed)
    pad_value = np.uint16(0x7FC0) if dtype == "bfloat16" else np.nan
    logits = padded(make_hidden(rng, shape, dtype), lengths, pad_value)
    rows = np.array(sorted(data.draw(st.sets(st.integers(0, shape[0] - 1), min_size=1))))
    result = device_pooling.splade(as_torch(logits, dtype), lengths[rows], rows, pooling,
                                   activation, chunk_values=chunk)
    expected = ref_splade(to_float32(logits, dtype)[rows], lengths[rows], pooling, activation)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, expected, rtol=TOL[dtype], atol=TOL[dtype])


def test_splade_edge_values():
    """All logits negative: a zero row; +inf stays +inf; a NaN logit of a real token makes its
    entry NaN (as torch's relu and max do); one token alone is its own max and sum."""
    logits = np.array([[[-1, -2, 3]], [[np.inf, 0, np.nan]]], dtype=np.float32)
    lengths = np.array([1, 1])
    for pooling in ext.SPLADE_POOLINGS:
        got = ext.splade(logits, lengths, pooling)
        np.testing.assert_array_equal(got[0], [0, 0, np.log1p(np.float32(3))])
        assert got[1, 0] == np.inf and got[1, 1] == 0 and np.isnan(got[1, 2])
    with pytest.raises(ValueError, match="pooling must be one of"):
        ext.splade(logits, lengths, "mean")
    with pytest.raises(ValueError, match="activation must be one of"):
        ext.splade(logits, lengths, "max", "gelu")


def test_splade_max_over_tokens_keeps_nan_and_empty_rows():
    """The max is taken of the logits, then activated once: a NaN of any real token still
    wins over larger logits before or after it, -inf, negative and zero logits give 0, and
    padding past a row's length is never read."""
    logits = np.array([[[np.nan, 1.0, -np.inf], [5.0, 2.0, -np.inf], [7.0, np.nan, 9.0]],
                       [[-np.inf, -1.0, 0.0], [9.0, 9.0, 9.0], [9.0, 9.0, 9.0]]],
                      dtype=np.float32)
    for activation in ("relu", "log1p_relu"):
        got = ext.splade(logits, np.array([3, 1]), "max", activation)
        assert np.isnan(got[0, 0]) and np.isnan(got[0, 1])
        expected = np.log1p(np.float32(9.0))
        expected = np.log1p(expected) if activation == "log1p_relu" else expected
        assert got[0, 2] == np.float32(expected)
        np.testing.assert_array_equal(got[1], [0, 0, 0])
        two = ext.splade(logits, np.array([2, 1]), "max", activation)  # row 0: tokens 0-1 only
        assert np.isnan(two[0, 0]) and two[0, 2] == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(-2**31, 2**31 - 1), max_size=40), max_size=30))
def test_flatten_ids_matches_reference(rows):
    flat, offsets = ext.flatten_ids(rows)
    assert flat.dtype == np.int32 and offsets.dtype == np.int64
    assert offsets.tolist() == [0, *np.cumsum([len(row) for row in rows]).tolist()]
    assert flat.tolist() == [i for row in rows for i in row]


def test_flatten_ids_refuses_what_is_not_lists_of_ints():
    with pytest.raises(ValueError, match="lists of ints"):
        ext.flatten_ids([(1, 2)])
    with pytest.raises(TypeError, match=r"rows\[0\]\[1\]: expected an int, got str"):
        ext.flatten_ids([[1, "2"]])
    with pytest.raises(OverflowError, match="does not fit int32"):
        ext.flatten_ids([[1], [2**31]])
    with pytest.raises(OverflowError):
        ext.flatten_ids([[-2**31 - 1]])


def test_flatten_ids_runs_no_python_inside_its_loop():
    """An item whose __index__ grows the list it is in (which would write past the buffer) is
    refused, not converted."""
    class Growing:
        def __index__(self):
            row.extend(range(100_000))
            return 7

    row = [0, 1, 2]
    row[0] = Growing()
    with pytest.raises(TypeError, match="expected an int"):
        ext.flatten_ids([row])


@st.composite
def buffers_and_picks(draw):
    """Flat buffers of texts (some empty, some with empty texts) and rows picking texts of them."""
    buffers = draw(st.lists(st.lists(st.lists(st.integers(-2**31, 2**31 - 1), max_size=12),
                                     min_size=1, max_size=8), min_size=1, max_size=5))
    picks = draw(st.lists(st.integers(0, 10**6), max_size=40))
    rows = []
    for pick in picks:
        j = pick % len(buffers)
        rows.append((j, (pick // len(buffers)) % len(buffers[j])))
    return buffers, rows


@settings(max_examples=80, deadline=None)
@given(buffers_and_picks())
def test_gather_rows_matches_reference(case):
    buffers, rows = case
    flats = [ext.flatten_ids(texts) for texts in buffers]
    job_of = np.array([j for j, _ in rows], dtype=np.int64)
    index = np.array([i for _, i in rows], dtype=np.int64)
    total = sum(len(buffers[j][i]) for j, i in rows)
    flat, offsets = ext.gather_rows([f for f, _ in flats], [o for _, o in flats], job_of, index,
                                    total)
    assert flat.tolist() == [t for j, i in rows for t in buffers[j][i]]
    assert offsets.tolist() == [0, *np.cumsum([len(buffers[j][i]) for j, i in rows]).tolist()]


def test_gather_rows_refuses_what_lies_outside_its_buffers():
    flat, offsets = ext.flatten_ids([[1, 2], [3]])
    first = np.zeros(1, dtype=np.int64)
    with pytest.raises(IndexError, match=r"job_of\[0\]: 1 is not a buffer"):
        ext.gather_rows([flat], [offsets], first + 1, first, 2)
    with pytest.raises(IndexError, match=r"index\[0\]: 2 is not a text of buffer 0"):
        ext.gather_rows([flat], [offsets], first, first + 2, 1)
    with pytest.raises(IndexError, match=r"index\[0\]: -1"):
        ext.gather_rows([flat], [offsets], first, first - 1, 1)
    with pytest.raises(ValueError, match="runs outside its buffer"):  # offsets past the ids
        ext.gather_rows([flat[:1]], [offsets], first, first, 2)
    with pytest.raises(ValueError, match="runs outside"):  # out too small
        ext.gather_rows([flat], [offsets], first, first, 1)
    with pytest.raises(ValueError, match="total: the rows hold 2 tokens, not 3"):
        ext.gather_rows([flat], [offsets], first, first, 3)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 20).flatmap(
    lambda groups: st.tuples(st.just(groups), st.lists(st.integers(0, groups - 1), max_size=60))))
def test_group_rows_matches_numpy(case):
    groups, group = case
    group = np.array(group, dtype=np.int64)
    present, number, order, ends = ext.group_rows(group, groups)
    expected_present, expected_number = np.unique(group, return_inverse=True)
    assert present.tolist() == expected_present.tolist()
    assert number.tolist() == expected_number.reshape(-1).tolist()
    assert order.tolist() == np.argsort(group, kind="stable").tolist()
    assert ends.tolist() == np.cumsum(np.bincount(group)[expected_present]).tolist()


def test_group_rows_refuses_a_row_outside_the_groups():
    with pytest.raises(IndexError, match=r"group\[1\]: 3 is not a group \(of 3\)"):
        ext.group_rows(np.array([0, 3]), 3)
    with pytest.raises(IndexError, match=r"group\[0\]: -1"):
        ext.group_rows(np.array([-1]), 3)


def greedy_run_reference(lengths: list[int], at: int, budget: int) -> tuple[int, int]:
    """Runs from the first, one text at a time: each the longest whose rows x last fits."""
    low = 0
    while True:
        high = low + 1
        while high < len(lengths) and (high + 1 - low) * lengths[high] <= budget:
            high += 1
        if high > at:
            return low, high
        low = high


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 600), min_size=1, max_size=300), st.integers(1, 5000),
       st.integers(0, 10**6))
def test_greedy_run_matches_reference(lengths, budget, pick):
    lengths.sort()
    keys = [length << 48 | arrival for arrival, length in enumerate(lengths)]
    at = pick % len(keys)
    assert ext.greedy_run(keys, at, budget, 48) == greedy_run_reference(lengths, at, budget)


def test_greedy_run_refuses_what_is_not_its_list_of_ints():
    with pytest.raises(IndexError, match="at: 3 is not an index of 3 keys"):
        ext.greedy_run([1, 2, 3], 3, 10, 0)
    with pytest.raises(TypeError, match=r"keys\[1\]: expected an int, got float"):
        ext.greedy_run([1, 2.0, 3], 2, 10, 0)
    with pytest.raises(ValueError, match="a list of ints"):
        ext.greedy_run((1, 2), 0, 10, 0)
