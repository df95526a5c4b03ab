"""Answer scoring: GSM8K's reference number after '####' against the last number of a response."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# A number: an optional sign not glued to a word or digit before it ("4-3" is not -3), digits,
# and decimals only when a digit follows the point ("$1,200." ends at 1200).
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?|\d+(?:\.\d+)?")
# Thousands separators only: "1,200" -> "1200", but "3, 4" stays two numbers.
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
GSM8K_MARK = "####"


def last_number(text: str) -> Decimal | None:
    """The last number in `text` once thousands commas are dropped; units and signs like $ or % are
    not part of it. None where there is no number."""
    found = _NUMBER.findall(_THOUSANDS.sub("", text))
    if not found:
        return None
    try:
        return Decimal(found[-1])
    except InvalidOperation:
        return None


def gsm8k_reference(answer: str) -> Decimal | None:
    """The number after '####' in a GSM8K answer field (None if the row has no such mark)."""
    if GSM8K_MARK not in answer:
        return None
    return last_number(answer.rsplit(GSM8K_MARK, 1)[1])


def score_gsm8k(response: str, answer: str) -> bool:
    """True if the response's last number equals the reference (3.50 != 3, 3.0 == 3)."""
    reference, given = gsm8k_reference(answer), last_number(response)
    return reference is not None and given is not None and given == reference
