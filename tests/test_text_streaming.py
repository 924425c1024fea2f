from __future__ import annotations

from transformers import AutoTokenizer

from layerstream.inference.generation import IncrementalDecoder, StopMatcher


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


def test_flush_releases_an_incomplete_character_at_the_end(model_factory):
    tokenizer = AutoTokenizer.from_pretrained(model_factory("gpt2").store)
    whole = tokenizer("✓")["input_ids"]
    assert len(whole) > 1  # a multi-byte character spread over byte-level tokens
    ids = [*tokenizer("ok ")["input_ids"], *whole[:-1]]  # ends inside the character
    decoder = IncrementalDecoder(tokenizer)
    text = "".join(decoder.add(i) for i in ids) + decoder.flush()
    assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert decoder.flush() == ""


def test_a_stop_string_completed_by_the_last_flush_ends_with_stop(model_factory):
    """The text held back at the end (an incomplete character decodes as U+FFFD) can itself
    complete a stop string: the request then stopped, it did not run out of length."""
    import torch

    from layerstream.inference.generation import _EventStreamer, generation_end

    tokenizer = AutoTokenizer.from_pretrained(model_factory("gpt2").store)
    ids = [*tokenizer("ok ")["input_ids"], *tokenizer("✓")["input_ids"][:-1]]
    events: list = []
    streamer = _EventStreamer(tokenizer, ["\ufffd"], events.append)
    streamer.put(torch.tensor([[0]]))  # the prompt
    for token in ids:
        streamer.put(torch.tensor([token]))
    assert not streamer.matcher.stopped  # nothing matched before the end
    final = generation_end(streamer, ids, eos_ids=set())
    assert final.finish_reason == "stop" and "\ufffd" not in final.text
    assert "".join(e.text for e in events) + final.text == "ok "
