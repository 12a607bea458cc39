"""LLMTIME encoding: format, round trips, tolerant decoding, and Qwen2.5 tokenization."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import REAL_DATA, TOKENIZER_JSON, requires_real_data, requires_tokenizer
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qwenlite.data.llmtime import LLMTimeSettings, allowed_characters, decode, encode, fit_alpha
from qwenlite.errors import QwenliteError
from qwenlite.preprocessor import main

FITTED = LLMTimeSettings(alpha=0.5)


def tolerance(settings: LLMTimeSettings) -> float:
    """Largest round-trip error: half a unit in the last decimal, in original units."""
    return settings.alpha * 0.5 * 10.0 ** -settings.decimals * (1 + 1e-9)


# ----- settings -----------------------------------------------------------------------------------
def test_settings_round_trip_through_json(tmp_path):
    s = LLMTimeSettings(decimals=3, alpha=0.123, percentile=95.0, target=5.0)
    s.save(tmp_path / "llmtime.json")
    assert LLMTimeSettings.load(tmp_path / "llmtime.json") == s
    assert LLMTimeSettings.from_dict(s.to_dict()) == s


@pytest.mark.parametrize("kwargs, fragment", [
    ({"decimals": -1}, "decimals"), ({"decimals": 2.5}, "decimals"), ({"alpha": 0.0}, "alpha"),
    ({"alpha": float("nan")}, "alpha"), ({"percentile": 0}, "percentile"),
    ({"target": -1.0}, "target"), ({"var_sep": "."}, "var_sep"), ({"time_sep": "5"}, "time_sep"),
    ({"time_sep": ";;"}, "time_sep"), ({"var_sep": ";"}, "differ"),
])
def test_bad_settings_are_one_clear_error(kwargs, fragment):
    with pytest.raises(QwenliteError, match=fragment):
        LLMTimeSettings(**kwargs)


def test_settings_load_errors(tmp_path):
    with pytest.raises(QwenliteError, match="no LLMTIME settings file"):
        LLMTimeSettings.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(QwenliteError, match="cannot read"):
        LLMTimeSettings.load(tmp_path / "bad.json")
    with pytest.raises(QwenliteError, match="unknown LLMTIME setting.*beta"):
        LLMTimeSettings.from_dict({"decimals": 2, "beta": 1})


# ----- fitting alpha ------------------------------------------------------------------------------
def test_fit_alpha_maps_the_percentile_to_the_target():
    rng = np.random.default_rng(0)
    train = rng.lognormal(0.0, 1.0, size=(50, 40, 2))
    base = LLMTimeSettings(percentile=95.0, target=10.0)
    fitted = fit_alpha(train, base)
    below = np.mean(train / fitted.alpha <= fitted.target)
    assert below == pytest.approx(0.95, abs=1 / train.size + 1e-12)
    assert base.alpha is None and fitted.signed is False  # a copy; the input is unchanged
    assert dataclasses.replace(fitted, alpha=None) == base


def test_fit_alpha_is_scale_equivariant_and_detects_signs():
    rng = np.random.default_rng(1)
    train = rng.uniform(0, 3, size=(10, 20, 2))
    a = fit_alpha(train, LLMTimeSettings()).alpha
    assert fit_alpha(7 * train, LLMTimeSettings()).alpha == pytest.approx(7 * a)
    assert fit_alpha(train - 1.0, LLMTimeSettings()).signed is True


@pytest.mark.parametrize("train, fragment", [
    (np.zeros((2, 3, 2)), "percentile"), (np.ones((3, 2)), "shape"),
    (np.full((1, 2, 2), np.nan), "non-finite"), (np.zeros((0, 3, 2)), "shape"),
])
def test_fit_alpha_rejects_unusable_training_data(train, fragment):
    with pytest.raises(QwenliteError, match=fragment):
        fit_alpha(train, LLMTimeSettings())


# ----- encoding -----------------------------------------------------------------------------------
def test_encode_format_every_timestep_terminated():
    x = np.array([[1.0, 0.5], [1.25, 0.375], [6.0, 0.0]])
    assert encode(x, FITTED) == "2.00,1.00;2.50,0.75;12.00,0.00;"
    assert encode(x, dataclasses.replace(FITTED, decimals=0)) == "2,1;2,1;12,0;"
    assert encode(x[:, :1], FITTED) == "2.00;2.50;12.00;"
    assert encode(x[:0], FITTED) == ""


def test_encode_never_writes_negative_zero():
    signed = dataclasses.replace(FITTED, signed=True)
    assert encode(np.array([[-1e-6, -0.75]]), signed) == "0.00,-1.50;"


@pytest.mark.parametrize("settings, x, fragment", [
    (LLMTimeSettings(), np.ones((3, 2)), "alpha is not set"),
    (FITTED, np.array([[1.0, np.nan]]), "non-finite"),
    (FITTED, np.array([[1.0, -0.5]]), "negative"),
    (FITTED, np.ones((2, 3, 2)), "shape"),
])
def test_encode_rejects(settings, x, fragment):
    with pytest.raises(QwenliteError, match=fragment):
        encode(x, settings)


def test_the_grammar_accepts_every_encoding_and_nothing_decode_cannot_read():
    from qwenlite.data.llmtime import grammar

    g = grammar(FITTED)
    rng = np.random.default_rng(3)
    for _ in range(20):
        text = encode(rng.uniform(0, 100, (30, 2)) * FITTED.alpha, FITTED)
        assert g.accepts(text)
    # the probe's failures: one decimal too many, and a cut or misplaced field
    for bad in ("0.11,0.008;", "0.16,0.0009;", "0.1,0.20;", "1.00;", "1.00,2.00,3.00;",
                "1.00,2.00", "1234.00,1.00;", ".50,1.00;", "1.00;2.00;"):
        assert not g.accepts(bad), bad
    assert g.accepts("999.99,0.00;")
    assert (g.table.max(1) >= 0).all()  # no dead end: every state allows a character
    # a random walk through the grammar always decodes in full
    for seed in range(30):
        walk, state, r = [], g.start, np.random.default_rng(seed)
        while len(walk) < 60 or state != g.start:
            col = r.choice(np.flatnonzero(g.table[state] >= 0))
            walk.append(g.chars[col])
            state = g.table[state, col]
        text = "".join(walk)
        assert decode(text, FITTED).n_invalid == 0 and decode(text, FITTED).n_steps == text.count(";")
    signed = grammar(dataclasses.replace(FITTED, signed=True, decimals=0), n_vars=3)
    assert signed.accepts("-1,20,-300;0,0,0;") and not signed.accepts("1.0,2,3;")
    assert not signed.accepts("1,2;") and not signed.accepts("--1,2,3;")


def test_allowed_characters_cover_every_encoding():
    assert set(allowed_characters(FITTED)) == set("0123456789.,;")
    assert "-" in allowed_characters(dataclasses.replace(FITTED, signed=True))
    assert "." not in allowed_characters(dataclasses.replace(FITTED, decimals=0))
    rng = np.random.default_rng(2)
    assert set(encode(rng.uniform(0, 100, (50, 2)), FITTED)) <= set(allowed_characters(FITTED))


# ----- round trips --------------------------------------------------------------------------------
@pytest.mark.parametrize("decimals", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("n_vars", [1, 2, 3])
def test_round_trip_random_series(decimals, n_vars):
    rng = np.random.default_rng(decimals * 10 + n_vars)
    x = rng.lognormal(0.0, 1.5, size=(200, n_vars))
    settings = fit_alpha(x[None], LLMTimeSettings(decimals=decimals))
    result = decode(encode(x, settings), settings, n_vars=n_vars)
    assert result.n_invalid == 0 and result.n_steps == 200
    assert result.values.dtype == np.float64 and result.values.shape == x.shape
    assert np.abs(result.values - x).max() <= tolerance(settings)


@hyp_settings(max_examples=150, deadline=None)
@given(x=hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, max_side=12),
                    elements=st.floats(-1e4, 1e4, allow_nan=False)),
       decimals=st.integers(0, 4), alpha=st.floats(1e-3, 1e3))
def test_round_trip_property(x, decimals, alpha):
    settings = LLMTimeSettings(decimals=decimals, alpha=alpha, signed=True)
    result = decode(encode(x, settings), settings, n_vars=x.shape[1])
    assert result.n_invalid == 0 and result.values.shape == x.shape
    np.testing.assert_allclose(result.values, x, rtol=1e-12, atol=tolerance(settings))


@requires_real_data
def test_round_trip_real_dataset():
    from qwenlite.data import load_dataset, split_systems

    traj = load_dataset(REAL_DATA).trajectories.astype(np.float64)
    split = split_systems(len(traj))
    settings = fit_alpha(traj[split.train], LLMTimeSettings())
    for i in range(len(traj)):
        result = decode(encode(traj[i], settings), settings)
        assert result.n_invalid == 0 and result.n_steps == traj.shape[1]
        assert np.abs(result.values - traj[i]).max() <= tolerance(settings)


# ----- tolerant decoding --------------------------------------------------------------------------
@pytest.mark.parametrize("text, steps, invalid", [
    ("", 0, 0),
    ("   \n", 0, 0),
    ("1.00,2.00;3.00,4.00;", 2, 0),
    ("1.00,2.00;3.00,4.00", 2, 0),           # complete last step, terminator not generated yet
    ("1.00,2.00;3.00,4.0", 1, 1),            # truncated last number
    ("1.00,2.00;3.00,", 1, 1),               # truncated after a separator
    ("1.00,2.00;3.00;5.00,6.00;", 1, 2),     # missing field: later steps would be misaligned
    ("1.00,2.00,3.00;", 0, 1),               # extra field
    ("1.00,2.00;hello world", 1, 1),         # stray text
    ("1.00,2.00;<|im_end|>", 1, 1),
    ("1.00,2.00;;3.00,4.00;", 1, 2),         # empty timestep
    ("-1.00,2.00;", 0, 1),                   # a sign the settings cannot produce
    ("1.2e3,2.00;", 0, 1),
    (" 1.00, 2.00 ;\n3.00,4.00;\n", 2, 0),   # whitespace around fields is tolerated
    ("01.00,2.00;", 1, 0),
])
def test_decode_is_tolerant(text, steps, invalid):
    result = decode(text, FITTED)
    assert (result.n_steps, result.n_invalid) == (steps, invalid)
    assert result.values.shape == (steps, 2)


def test_decode_returns_original_units():
    result = decode("2.00,1.00;2.50,0.75;", FITTED)
    np.testing.assert_array_equal(result.values, [[1.0, 0.5], [1.25, 0.375]])


@pytest.mark.parametrize("number, alpha", [("1" * 400 + ".00", 0.5), ("1" * 308 + ".00", 1e3)])
def test_decode_rejects_huge_numbers_instead_of_returning_inf(number, alpha):
    result = decode(f"1.00,1.00;{number},1.00;", LLMTimeSettings(alpha=alpha))
    assert result.n_steps == 1 and result.n_invalid == 1 and np.isfinite(result.values).all()


def test_decode_needs_alpha():
    with pytest.raises(QwenliteError, match="alpha is not set"):
        decode("1.00,2.00;", LLMTimeSettings())


CHARS = st.sampled_from(list("0123456789.,;-") + [" ", "\n", "a", "e", "<", "|"])


@hyp_settings(max_examples=400, deadline=None)
@given(text=st.one_of(st.text(), st.text(CHARS)), n_vars=st.integers(1, 4),
       decimals=st.integers(0, 3), signed=st.booleans())
def test_decode_never_raises_and_is_well_formed(text, n_vars, decimals, signed):
    settings = LLMTimeSettings(decimals=decimals, alpha=0.37, signed=signed)
    result = decode(text, settings, n_vars=n_vars)
    assert isinstance(result.values, np.ndarray) and result.values.dtype == np.float64
    assert result.values.shape == (result.n_steps, n_vars)
    assert np.isfinite(result.values).all()
    assert signed or (result.values >= 0).all()
    assert result.n_invalid >= 0
    assert result.n_steps + result.n_invalid <= text.count(settings.time_sep) + 1


@hyp_settings(max_examples=150, deadline=None)
@given(x=hnp.arrays(np.float64, (6, 2), elements=st.floats(0, 50)), cut=st.integers(0, 200),
       decimals=st.integers(1, 3))
def test_decoding_a_cut_encoding_gives_a_prefix(x, cut, decimals):
    """A generation stopped anywhere decodes to a prefix of the series: nothing half-written."""
    settings = LLMTimeSettings(decimals=decimals, alpha=0.5)
    text = encode(x, settings)
    full = decode(text, settings).values
    prefix = text[:cut]
    part = decode(prefix, settings)
    np.testing.assert_array_equal(part.values, full[: part.n_steps])
    complete = prefix.count(";")
    if prefix == "" or prefix.endswith(";"):
        assert (part.n_steps, part.n_invalid) == (complete, 0)
    else:  # a partial timestep is used only when it is whole (cut just before its ";")
        assert (part.n_steps, part.n_invalid) in ((complete, 1), (complete + 1, 0))


# ----- Qwen2.5 tokenization -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from qwenlite.data.tokenizer import Tokenizer

    return Tokenizer(TOKENIZER_JSON)


@requires_tokenizer
def test_coursework_tokenization_example(tokenizer):
    assert tokenizer.encode("1.23") == [16, 13, 17, 18]


@requires_tokenizer
@pytest.mark.parametrize("decimals", [1, 2, 3])
def test_each_character_of_an_encoding_is_one_token(tokenizer, decimals):
    settings = LLMTimeSettings(decimals=decimals, alpha=0.6)
    char_ids = {c: tokenizer.encode(c) for c in allowed_characters(settings)}
    assert all(len(ids) == 1 for ids in char_ids.values())
    rng = np.random.default_rng(decimals)
    x = rng.lognormal(0.0, 1.5, size=(100, 2))  # values up to a few hundred after scaling
    text = encode(x, settings)
    ids = tokenizer.encode(text)
    assert ids == [char_ids[c][0] for c in text]
    assert tokenizer.decode(ids) == text


# ----- the question 2(a) command ------------------------------------------------------------------
@requires_tokenizer
def test_examples_command_prints_strings_and_their_token_ids(tmp_path, capsys, tokenizer):
    from qwenlite.data import simulate_to

    data = simulate_to(tmp_path / "d.h5", n_systems=20, n_points=30)
    code = main(["--examples", "2", "--data", str(data), "--tokenizer", str(TOKENIZER_JSON)])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    strings = [lines[i + 1] for i, line in enumerate(lines) if line == "LLMTIME:"]
    id_lists = [lines[i + 1] for i, line in enumerate(lines) if line == "Qwen2.5 token ids:"]
    assert len(strings) == len(id_lists) == 2
    for text, ids in zip(strings, id_lists):
        assert text.count(";") == 30 and text.endswith(";")
        assert eval(ids) == tokenizer.encode(text)  # noqa: S307 - a printed list of ints


def test_examples_command_with_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    code = main(["--weights", str(tmp_path / "nowhere"), "--data", str(tmp_path / "none.h5")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
