"""A cell's responses: scored against reference answers, and kept for a JSONL file on request."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from w2w.data import Prompt
from w2w.files import write_atomic
from w2w.records import RankRecord, run_dir
from w2w.scoring import gsm8k_reference, score_gsm8k

RESPONSES_FILE = "responses.jsonl"
# Datasets whose rows carry a reference answer, and the one function that scores against it.
SCORERS = {"gsm8k": score_gsm8k}
# ... and the one that says whether a reference can be scored against at all (GSM8K: a number after '####').
SCORABLE = {"gsm8k": lambda answer: gsm8k_reference(answer) is not None}


def responses_path(sweep_dir: str | Path, cid: str, repeat: int = 0) -> Path:
    return run_dir(sweep_dir, cid, repeat) / RESPONSES_FILE


def response_part_path(sweep_dir: str | Path, cid: str, batch: int, repeat: int = 0) -> Path:
    """One batch's lines, kept until the cell ends (a resumed cell joins earlier segments' parts)."""
    return run_dir(sweep_dir, cid, repeat) / f"responses-batch-{batch:05d}.part.jsonl"


def first_missing_part(sweep_dir: str | Path, cid: str, done: int, repeat: int = 0) -> int:
    """The first of the `done` batches whose responses part is missing (done where none is): a resumed
    cell starts there, so that its responses file can be joined whole."""
    return next((i for i in range(done) if not response_part_path(sweep_dir, cid, i, repeat).is_file()), done)


def join_response_parts(sweep_dir: str | Path, cid: str, num_batches: int, repeat: int = 0) -> str:
    """The cell's responses file from its batches' parts, in prompt order, atomically; the parts go
    once it exists. Returns the file's name for the record."""
    parts = [response_part_path(sweep_dir, cid, i, repeat) for i in range(num_batches)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise RuntimeError(f"responses of batch(es) {', '.join(missing)} are missing from {run_dir(sweep_dir, cid, repeat)} "
                           f"(removed while the cell ran?): re-run the same command: the cell resumes at the first "
                           f"batch without its responses; delete nothing, the cell's other results are good")
    path = responses_path(sweep_dir, cid, repeat)
    write_atomic(path, b"".join(p.read_bytes() for p in parts))
    for part in parts:
        part.unlink()
    return path.name


def no_score_reason(dataset: str) -> str | None:
    """Why a dataset's responses cannot be scored, or None where they can."""
    if dataset in SCORERS:
        return None
    return f"dataset {dataset} has no reference answers to score against"


@dataclass
class Responses:
    """Every response of a cell in prompt order: `correct` and `scored` for the record, and the
    lines of the responses file when `keep` is set."""

    dataset: str
    keep: bool = False
    scored: int = 0
    correct: int = 0
    unscorable: int = 0  # responses whose reference has no answer to score against: neither right nor wrong
    ended: dict[str, int] = field(default_factory=dict)  # how many responses ended each way (Generation.ended_by)
    lines: list[dict] = field(default_factory=list)

    def add(self, rows: list[Prompt], prompt_tokens: list[int], outputs: list[list[int]], texts: list[str],
            ended_by: list[str]) -> None:
        """One batch's responses; ended_by: how each ended, as the engine's Generation says."""
        scorer, scorable = SCORERS.get(self.dataset), SCORABLE.get(self.dataset)
        for row, n_prompt, out, text, ended in zip(rows, prompt_tokens, outputs, texts, ended_by, strict=True):
            self.ended[ended] = self.ended.get(ended, 0) + 1
            correct = None
            if scorer is not None and row.reference is not None and scorable is not None and not scorable(row.reference):
                self.unscorable += 1
            elif scorer is not None and row.reference is not None:
                correct = scorer(text, row.reference)
                self.scored += 1
                self.correct += int(correct)
            if self.keep:
                self.lines.append({
                    "prompt_id": row.id, "prompt": row.text, "response": text, "prompt_tokens": n_prompt,
                    "output_tokens": len(out), "ended_by": ended, "correct": correct,
                })

    def write(self, path: Path) -> str:
        """The responses file, atomically; returns its name for the record."""
        write_atomic(path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in self.lines).encode())
        return path.name


def responses_problem(sweep_dir: str | Path, record: RankRecord) -> str | None:
    """Why the responses file an ok record says it saved does not match the record's counts
    (damaged: cut short, edited, from another run), or None where it matches or none was saved."""
    block = record.responses or {}
    if not record.ok or not block.get("saved") or record.counts is None:
        return None
    path = run_dir(sweep_dir, record.cell_id, record.repeat) / (block.get("file") or RESPONSES_FILE)
    try:
        lines = [json.loads(line) for line in path.read_text().splitlines()]
    except OSError:
        return f"{path.name} is missing (the record says it was saved)"
    except ValueError as exc:  # JSON, or text that is not UTF-8
        return f"{path.name} does not parse ({type(exc).__name__}: {exc})"
    counts = record.counts
    if len(lines) != counts.responses:
        return f"{path.name} has {len(lines)} line(s) where its record counts {counts.responses} response(s)"
    if not all(isinstance(line, dict) for line in lines):
        return f"{path.name} has a line that is not a JSON object"
    ids = [line.get("prompt_id") for line in lines]
    if len(set(map(str, ids))) != len(ids):
        return f"{path.name} repeats a prompt_id"
    correct = sum(1 for line in lines if line.get("correct") is True)
    if counts.scored and correct != counts.correct:
        return f"{path.name} marks {correct} response(s) correct where its record counts {counts.correct}"
    return None
