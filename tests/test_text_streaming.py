from __future__ import annotations

from transformers import AutoTokenizer

from layerstream.generation import IncrementalDecoder, StopMatcher


def test_incremental_decoding_adds_up_to_the_full_decode(model_factory):
    tokenizer = AutoTokenizer.from_pretrained(model_factory("llama").store)
    ids = tokenizer("Once upon a time, a model streamed its layers: ünïcödé ✓ 42!")["input_ids"]
    decoder = IncrementalDecoder(tokenizer)
    text = "".join(decoder.add(i) for i in ids)
    assert text == tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_string_is_cut_and_never_sent():
    matcher = StopMatcher(["END"])
    sent = [matcher.feed(d) for d in ["hello E", "N", "D and more"]]
    assert "".join(sent) == "hello "
    assert matcher.stopped
    assert matcher.flush() == ""


def test_possible_stop_prefix_is_held_then_released():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("a ST") == "a "
    assert matcher.feed("AR") == "STAR"
    assert matcher.feed("T") == "T"
    assert matcher.feed(" S") == " "
    assert matcher.flush() == "S"
    assert not matcher.stopped


def test_earliest_of_several_stop_strings_wins():
    matcher = StopMatcher(["xyz", "\n"])
    assert matcher.feed("line one\nxyz") == "line one"


def test_no_stop_strings_passes_text_through():
    matcher = StopMatcher([])
    assert matcher.feed("abc") == "abc"
    assert matcher.flush() == ""
