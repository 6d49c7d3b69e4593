"""The reasoning splitter: tags split anywhere, prompts that open <think>, unterminated blocks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from llamad.serve.reasoning import ReasoningSplitter


def split(pieces: list[str], starts_in_reasoning: bool = False) -> tuple[str, str]:
    splitter = ReasoningSplitter(starts_in_reasoning)
    reasoning, text = "", ""
    for piece in pieces:
        for kind, part in splitter.feed(piece):
            if kind == "reasoning":
                reasoning += part
            else:
                text += part
    for kind, part in splitter.finish():
        if kind == "reasoning":
            reasoning += part
        else:
            text += part
    return reasoning, text


def test_plain_text_passes_through_unchanged():
    assert split(["Hello", " world", " <b>bold</b> a < b"]) == ("", "Hello world <b>bold</b> a < b")


def test_think_block_then_answer():
    assert split(["<think>\nstep 1\n</think>\n\nThe answer is 4."]) == ("step 1\n", "The answer is 4.")


def test_tags_split_across_pieces():
    assert split(["<thi", "nk>ponder", "ing</th", "ink>", "Done"]) == ("pondering", "Done")


def test_prompt_opened_the_block_only_the_close_tag_appears():
    assert split(["weighing options", "</think>", "Yes."], starts_in_reasoning=True) == ("weighing options", "Yes.")


def test_unterminated_block_at_token_limit_is_all_reasoning():
    assert split(["<think>I am still thin", "king about"]) == ("I am still thinking about", "")


def test_a_partial_tag_at_the_end_is_text_after_all():
    assert split(["The tag starts with <thi"]) == ("", "The tag starts with <thi")


def test_text_is_not_held_back_longer_than_a_possible_tag():
    splitter = ReasoningSplitter()
    assert splitter.feed("Hello <") == [("text", "Hello ")]
    assert splitter.feed("p>") == [("text", "<p>")]


@settings(max_examples=300, deadline=None)
@given(
    reasoning=st.text(alphabet=st.characters(blacklist_characters="<>"), max_size=40),
    answer=st.text(alphabet=st.characters(blacklist_characters="<>"), min_size=1, max_size=40).filter(
        lambda s: s.strip() != ""
    ),
    borders=st.lists(st.integers(min_value=1, max_value=200), max_size=30),
    opened_by_prompt=st.booleans(),
)
def test_random_chunk_borders_give_the_same_split(reasoning, answer, borders, opened_by_prompt):
    whole = ("" if opened_by_prompt else "<think>") + reasoning + "</think>" + answer
    pieces, last = [], 0
    for border in sorted(set(b for b in borders if b < len(whole))):
        pieces.append(whole[last:border])
        last = border
    pieces.append(whole[last:])
    assert split(pieces, opened_by_prompt) == split([whole], opened_by_prompt)
    got_reasoning, got_text = split(pieces, opened_by_prompt)
    assert got_reasoning == reasoning.lstrip()
    assert got_text == answer.lstrip()
