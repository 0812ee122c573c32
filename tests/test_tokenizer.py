"""The tokenizer: a tiktoken Encoding built in code (no download), digits one token each, the
R1 tags and end-of-text as single special tokens, and an exact round trip on every document."""
import os
import random
import subprocess
import sys

import pytest

import data
import nanor1
from nanor1 import enc, encode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAGS = ["<|endoftext|>", "<think>", "</think>", "<answer>", "</answer>"]


def documents(n_per_level=300, seed=0):
    """Direct and worked documents of every level, and the prompts the model sees."""
    rng = random.Random(seed)
    for level in data.LEVELS:
        for _ in range(n_per_level):
            p = data.make_problem(level, rng)
            yield p.document(think=False)
            yield p.document(think=True)
            yield f"{p.text}="


def test_round_trip_is_exact_on_documents_of_every_level():
    n = 0
    for text in documents():
        ids = encode(text)
        assert enc.decode(ids) == text
        # and token by token: the bytes of the tokens concatenate to the text
        assert b"".join(enc.decode_single_token_bytes(t) for t in ids) == text.encode()
        n += 1
    assert n == 3 * 300 * len(data.LEVELS)


def test_round_trip_on_arbitrary_text_and_packed_rows():
    """Non-ASCII text, whitespace and several documents glued by end-of-text come back unchanged."""
    samples = ["", " ", "\n\t", "héllo wörld ٣ ³ ４２ 🙂", "12 + 34 = 46", "<think>a</think>\n<answer>-7</answer>",
               "<|endoftext|>1+2=<answer>3</answer><|endoftext|>9*9=<answer>81</answer>"]
    for text in samples:
        assert enc.decode(encode(text)) == text


@pytest.mark.parametrize("digit", list("0123456789"))
def test_every_digit_is_exactly_one_token(digit):
    ids = encode(digit)
    assert len(ids) == 1
    assert enc.decode_single_token_bytes(ids[0]) == digit.encode()


def test_digits_are_never_merged_with_neighbours():
    """In every document each digit is its own token, whatever surrounds it."""
    digit_ids = {encode(d)[0] for d in "0123456789"}
    assert len(digit_ids) == 10
    for text in documents(n_per_level=100, seed=1):
        ids = encode(text)
        n_digit_chars = sum(c.isdigit() for c in text)
        assert sum(t in digit_ids for t in ids) == n_digit_chars
        for t in ids:   # no token holds a digit together with anything else
            b = enc.decode_single_token_bytes(t)
            assert not (len(b) > 1 and any(chr(c).isdigit() for c in b))
    assert encode("1234567890") == [encode(d)[0] for d in "1234567890"]


@pytest.mark.parametrize("tag", TAGS)
def test_special_tags_are_single_tokens(tag):
    ids = encode(tag)
    assert len(ids) == 1
    assert enc.decode(ids) == tag
    assert ids[0] >= 256  # not one of the 256 byte tokens


def test_tag_ids_are_distinct_and_match_module_constants():
    ids = [encode(t)[0] for t in TAGS]
    assert len(set(ids)) == len(TAGS)
    assert ids == [nanor1.EOT, nanor1.THINK, nanor1.END_THINK, nanor1.ANSWER, nanor1.END_ANSWER]
    assert enc.n_vocab == 256 + len(TAGS)


def test_tags_inside_a_document_are_one_token_each():
    text = "47+85=<think>47+85:7+5=12,4+8+1=13>132</think><answer>132</answer>"
    ids = encode(text)
    for tag_id in (nanor1.THINK, nanor1.END_THINK, nanor1.ANSWER, nanor1.END_ANSWER):
        assert ids.count(tag_id) == 1
    # "47+85=" is six one-character tokens, then <think>
    assert ids[:7] == [encode(c)[0] for c in "47+85="] + [nanor1.THINK]


def test_prompt_tokens_start_with_end_of_text():
    p = data.Problem("add2", "47+85", 132, "")
    assert nanor1.prompt_tokens(p) == [nanor1.EOT] + [encode(c)[0] for c in "47+85="]


def test_tokenizer_is_built_without_network(tmp_path):
    """In a fresh process where every socket call fails and tiktoken's cache is empty, importing
    nanor1 and building the tokenizer still works and gives the same encoding."""
    script = r"""
import socket, sys
def no_network(*a, **k):
    raise RuntimeError("network used")
socket.socket.connect = no_network
socket.socket.connect_ex = no_network
socket.create_connection = no_network
socket.getaddrinfo = no_network
sys.path.insert(0, sys.argv[1])
import nanor1
e = nanor1.build_tokenizer()
text = "(47+85)*3-29=<think>x</think><answer>367</answer>"
assert e.decode(e.encode(text, allowed_special="all")) == text
assert e.encode(text, allowed_special="all") == nanor1.encode(text)
print("ok", e.n_vocab)
"""
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(tmp_path), DATA_GYM_CACHE_DIR=str(tmp_path),
               OMP_NUM_THREADS="1", http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    r = subprocess.run([sys.executable, "-c", script, ROOT], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ok", str(256 + len(TAGS))]
    assert list(tmp_path.iterdir()) == []  # nothing was downloaded into the cache
