"""IncrementalDetokenizer with SmolLM2's tokenizer: token-by-token pieces join to the full decode,
multi-byte characters arrive whole (never "\ufffd"), special tokens are skipped on request, stop
strings (across token boundaries, kept or cut, earliest first) and the held-back visible text."""

from __future__ import annotations

import pytest

from framework.api.detokenizer import IncrementalDetokenizer, visible_text
from framework.request import LlmRequest, RequestState
from framework.sampling_params import SamplingParams

PROMPT = "Say:"


@pytest.fixture(scope="session")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def new_request(tok, **kwargs) -> LlmRequest:
    params = SamplingParams(max_tokens=256, **kwargs)
    return LlmRequest("r", tok.encode(PROMPT), params, state=RequestState.GENERATION)


def stream(tok, ids, request=None, **kwargs):
    """Feed `ids` one at a time, as the executor does (append, then update). Stops feeding at the
    first stop string. Returns (pieces, request, stops) with `stops[i]` what update i returned."""
    request = request or new_request(tok, **kwargs)
    detok = IncrementalDetokenizer(tok)
    pieces, stops = [], []
    for token in ids:
        request.output_token_ids.append(token)
        before = len(request.output_text)
        stop = detok.update(request, token)
        stops.append(stop)
        pieces.append(request.output_text[before:])
        if stop is not None:
            break
    return pieces, request, stops


TEXTS = {
    "emoji": "I love 🍕 and 🎉!",
    "emoji_leading_space": " Party time 🎉🎉 🍕🍕🍕 done 👍🏽.",
    "cjk": "你好，世界。日本語のテキスト",
    "accents": " Ünïcödé àccénts: naïve façade, Ærø, Straße, crème brûlée",
    "whitespace": "x\n\n\n  y    z\t\t w \n",
    "code": 'def f(x):\n    return {"a": x**2}  # sq\n\nprint(f(3))\n',
    "mixed": "Résumé 📄: 東京 → Paris — ok?  Ça va… 👋🏻\n\tEnd",
    "plain": " Hello world, this is a test.",
}


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_pieces_join_to_full_decode_and_never_hold_replacement_chars(tok, name):
    ids = tok.encode(TEXTS[name])
    pieces, request, stops = stream(tok, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert request.output_text == TEXTS[name]  # the tokenizer round-trips these texts
    assert stops == [None] * len(ids)


def test_multibyte_characters_arrive_whole(tok):
    ids = tok.encode("I love 🍕 and 🎉!")
    assert len(ids) > len("I love 🍕 and 🎉!".split())  # the emoji span several byte tokens
    pieces, _, _ = stream(tok, ids)
    assert " 🍕" in pieces and " 🎉" in pieces
    # the byte tokens before each completed emoji give nothing yet (two per emoji here)
    assert pieces.count("") >= 4


def test_cjk_characters_arrive_whole(tok):
    text = "你好，世界。日本語のテキスト"
    pieces, _, _ = stream(tok, tok.encode(text))
    for piece in pieces:
        assert "\ufffd" not in piece
    # every non-empty piece is a run of whole characters of the text, in order
    assert "".join(pieces) == text
    assert all(p == "" or p in text for p in pieces)


def test_first_token_spacing_is_kept(tok):
    for text in (" Hello", "Hello", "  two spaces", "\nnewline"):
        ids = tok.encode(text)
        pieces, request, _ = stream(tok, ids)
        assert request.output_text == text


@pytest.mark.parametrize("text", ["Hello", " Hello there", "🎉 ok"])
def test_special_tokens_skipped_when_asked(tok, text):
    eos, bos = tok.eos_token_id, tok.bos_token_id
    ids = [bos] + tok.encode(text) + [eos] + tok.encode(" world") + [eos]
    pieces, request, _ = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert tok.eos_token not in request.output_text and tok.bos_token not in request.output_text
    assert request.output_text == text + " world"


def test_special_tokens_kept_when_not_skipped(tok):
    eos = tok.eos_token_id
    ids = tok.encode(" Hello") + [eos] + tok.encode(" world")
    pieces, request, _ = stream(tok, ids, skip_special_tokens=False)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=False)
    assert request.output_text == " Hello" + tok.eos_token + " world"


def test_long_mixed_stream(tok):
    text = "".join(TEXTS[k] for k in sorted(TEXTS)) * 3
    ids = tok.encode(text)
    pieces, request, _ = stream(tok, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert request.output_text == tok.decode(ids, skip_special_tokens=True) == text


# ---- stop strings ------------------------------------------------------------------------------

ANSWER = " The answer is 42. Done STOP here"  # ' ST' + 'OP' are two tokens


def test_stop_string_across_token_boundary_is_cut_and_returned(tok):
    ids = tok.encode(ANSWER)
    assert "STOP" not in [tok.decode([i]) for i in ids] and " ST" in [tok.decode([i]) for i in ids]
    pieces, request, stops = stream(tok, ids, stop=["STOP"])
    assert stops[-1] == "STOP" and all(s is None for s in stops[:-1])
    assert tok.decode(request.output_token_ids) == " The answer is 42. Done STOP"  # stopped at 'OP'
    assert request.output_text == " The answer is 42. Done "
    assert "STOP" not in request.output_text


def test_stop_string_over_three_tokens(tok):
    ids = tok.encode(ANSWER)  # ' is', ' ', '4' are three tokens
    _, request, stops = stream(tok, ids, stop=["is 4"])
    assert stops[-1] == "is 4"
    assert request.output_text == " The answer "


def test_include_stop_str_in_output_keeps_it(tok):
    _, request, stops = stream(tok, tok.encode(ANSWER), stop=["STOP"], include_stop_str_in_output=True)
    assert stops[-1] == "STOP"
    assert request.output_text == " The answer is 42. Done STOP"


def test_text_after_the_stop_string_in_the_same_token_is_dropped(tok):
    # ' world' completes "wor"; its "ld" is cut too
    _, cut, stops = stream(tok, tok.encode(" Hello world, this"), stop=["o wor"])
    assert stops[-1] == "o wor" and cut.output_text == " Hell"
    _, kept, _ = stream(tok, tok.encode(" Hello world, this"), stop=["o wor"], include_stop_str_in_output=True)
    assert kept.output_text == " Hello wor"


def test_earliest_stop_string_wins_when_several_complete_together(tok):
    ids = tok.encode(" Hello world, this is a test.")
    # ' world' completes both; "lo w" starts first although "world" is listed first
    _, request, stops = stream(tok, ids, stop=["world", "lo w"])
    assert stops[-1] == "lo w"
    assert request.output_text == " Hel"
    _, request, stops = stream(tok, ids, stop=["world", "lo w"], include_stop_str_in_output=True)
    assert stops[-1] == "lo w"
    assert request.output_text == " Hello w"


def test_first_completed_stop_string_ends_the_stream(tok):
    ids = tok.encode(" Hello world, this is a test.")
    _, request, stops = stream(tok, ids, stop=["test", "this", ", "])
    assert stops[-1] == ", "
    assert request.output_text == " Hello world"
    assert len(stops) == 4  # ' Hello', ' world', ',', ' this': the ", " completes with ' this'


def test_stop_string_in_the_prompt_does_not_match(tok):
    assert ":" in PROMPT
    _, request, stops = stream(tok, tok.encode(" Hello world"), stop=[":"])
    assert stops == [None, None] and request.output_text == " Hello world"
    _, request, stops = stream(tok, tok.encode(" a: b"), stop=[":"])
    assert stops[-1] == ":" and request.output_text == " a"


def test_stop_string_made_of_multibyte_characters(tok):
    text = "你好，世界。日本語のテキスト"
    _, request, stops = stream(tok, tok.encode(text), stop=["。日本"])
    assert stops[-1] == "。日本"
    assert request.output_text == "你好，世界"


def test_check_stop_false_ignores_stop_strings(tok):
    request = new_request(tok, stop=["STOP"])
    detok = IncrementalDetokenizer(tok)
    for token in tok.encode(ANSWER):
        request.output_token_ids.append(token)
        assert detok.update(request, token, check_stop=False) is None
    assert request.output_text == ANSWER


# ---- visible text ------------------------------------------------------------------------------


def test_visible_text_holds_back_a_possible_stop_prefix_while_running(tok):
    stops = ["STOP", "xy"]  # longest 4: hold back 3 characters
    request = new_request(tok, stop=stops)
    detok = IncrementalDetokenizer(tok)
    ids = tok.encode(ANSWER)
    shown = []
    for token in ids:
        request.output_token_ids.append(token)
        stop = detok.update(request, token)
        if stop is not None:
            request.state = RequestState.FINISHED
        text = request.output_text
        if request.is_finished:
            assert visible_text(request) == text
        else:
            assert visible_text(request) == text[: max(0, len(text) - 3)]
        shown.append(visible_text(request))
        if stop is not None:
            break
    final = request.output_text
    assert final == " The answer is 42. Done "
    # nothing shown along the way is ever taken back: each view is a prefix of the final text
    assert all(final.startswith(s) for s in shown)
    # while ' ST' was the tail, "ST" was not shown
    assert not any("ST" in s for s in shown)


def test_visible_text_short_texts_and_finish(tok):
    request = new_request(tok, stop=["LONGSTOP"])  # hold back 7
    request.output_text = "abc"
    assert visible_text(request) == ""
    request.output_text = "abcdefg"
    assert visible_text(request) == ""
    request.output_text = "abcdefgh"
    assert visible_text(request) == "a"
    request.state = RequestState.FINISHED
    assert visible_text(request) == "abcdefgh"


def test_visible_text_without_stop_strings_or_with_one_char_stops(tok):
    request = new_request(tok)
    request.output_text = "all of it"
    assert visible_text(request) == "all of it"
    request = new_request(tok, stop=["\n", "."])  # single characters: nothing to hold back
    request.output_text = "all of it"
    assert visible_text(request) == "all of it"
