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


def _byte_token(tokenizer, byte: int) -> int:
    """The id of the byte-level token for one byte (GPT-2's byte-to-unicode alphabet)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return tokenizer.convert_tokens_to_ids(bytes_to_unicode()[byte])


def test_bytes_that_never_form_text_are_sent_as_they_settle_not_at_the_end(model_factory):
    """A random-init model's bytes rarely form UTF-8, and every text ending in U+FFFD was
    held back: a demo chat arrived in one piece at the end. Text followed by three tokens
    that add text is settled (a character is at most four bytes) and is sent."""
    import random

    tokenizer = AutoTokenizer.from_pretrained(model_factory("gpt2").store)
    rng = random.Random(7)
    for _ in range(50):
        ids = [_byte_token(tokenizer, rng.choice(range(0x80, 0x100))) for _ in range(40)]
        decoder = IncrementalDecoder(tokenizer)
        deltas = [decoder.add(i) for i in ids]
        assert "".join(deltas) + decoder.flush() == tokenizer.decode(ids)
        # piece by piece: after each token, all but the text of its last few tokens is sent
        for k in range(MAX, len(ids)):
            sent = "".join(deltas[: k + 1])
            assert len(sent) >= len(tokenizer.decode(ids[: k + 1 - MAX])) - 1, (k, deltas)


MAX = 4  # a character's most bytes


def test_a_character_split_over_tokens_is_never_sent_broken(model_factory):
    """Valid characters among invalid bytes: the settled text never cuts one, whatever the
    bytes around it (the deltas always add up to the whole decode, with every ✓ in it)."""
    import random

    tokenizer = AutoTokenizer.from_pretrained(model_factory("gpt2").store)
    check = [_byte_token(tokenizer, b) for b in "✓".encode()]
    rng = random.Random(11)
    for _ in range(50):
        ids: list[int] = []
        for _ in range(12):
            choice = rng.random()
            if choice < 0.4:
                ids += check
            elif choice < 0.8:
                ids.append(_byte_token(tokenizer, rng.choice(range(0x80, 0x100))))
            else:
                ids += tokenizer("ab")["input_ids"]
        decoder = IncrementalDecoder(tokenizer)
        deltas = [decoder.add(i) for i in ids]
        whole = tokenizer.decode(ids)
        assert "".join(deltas) + decoder.flush() == whole
        assert all(whole.startswith("".join(deltas[: k + 1])) for k in range(len(deltas)))
