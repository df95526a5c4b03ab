"""GSM8K scoring on real test rows (tests/data/gsm8k_rows.jsonl, copied from GSM8K's test split)."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from w2w.scoring import gsm8k_reference, last_number, score_gsm8k

ROWS = [json.loads(line) for line in (Path(__file__).parent / "data" / "gsm8k_rows.jsonl").open()]


def _row(reference: str) -> dict:
    return next(r for r in ROWS if r["answer"].rsplit("####", 1)[1].strip() == reference)


def test_references_of_real_rows():
    assert [gsm8k_reference(r["answer"]) for r in ROWS] == [
        Decimal(v) for v in ("18", "3", "114200", "1200", "-10", "-3")
    ]


@pytest.mark.parametrize(
    ("reference", "response", "correct"),
    [
        ("1200", "She pays 300 a month, so over four months she pays $1,200.", True),
        ("1200", "The answer is 1,200 dollars", True),
        ("1200", "The answer is 1,2000", False),
        ("114,200", "Total: $114,200", True),
        ("-3", "The difference is -3", True),
        ("-3", "so 4-3 = 1, then the change is -3.", True),
        ("-3", "The difference is 3", False),
        ("-10", "He lost $10, i.e. -10 dollars", True),
        ("3", "It takes 3.50 bolts", False),
        ("3", "It takes 3.0 bolts", True),
        ("3", "2 + 1 = 3 bolts in total.", True),
        ("3", "It takes three bolts.", False),
        ("18", "", False),
        ("18", "She makes 9 * 2 = 18 dollars. Then 20% tip", False),  # the last number counts
        ("18", "She makes $18 every day at 16 - 3 - 4 = 9 eggs... so 18", True),
    ],
)
def test_score_hand_written_responses(reference: str, response: str, correct: bool):
    assert score_gsm8k(response, _row(reference)["answer"]) is correct


def test_no_number_and_no_reference():
    assert last_number("no number at all") is None
    assert gsm8k_reference("an answer without the mark 42") is None
    assert score_gsm8k("42", "an answer without the mark 42") is False
    assert last_number("3, 4") == Decimal(4)
