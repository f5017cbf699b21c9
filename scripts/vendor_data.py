"""Rebuild the vendored evaluation/training data from the team's shared copies (run by hand).

    FEDPT_HOME=... python scripts/vendor_data.py ../shared/data src/fedpt/data/vendored

Writes, in fedpt's record format (``instruction``, ``context``, ``response``, ``category``,
optional ``references``):
- ``dolly-15k.jsonl.gz``: databricks-dolly-15k, all 15,011 records, unchanged (copied).
- ``self-instruct-252.jsonl``: Self-Instruct's 252 user-oriented instructions.
- ``sni-test.jsonl``: the S-NI test instances at hand (3 of the 119 test tasks: the 100 listed
  per task in the official references file), kept when the longest reference is more than
  11 tokens under the Qwen2.5 tokenizer (MiniLLM's ``sinst/11_`` filter; MiniLLM counted GPT-2
  tokens, which we do not have offline).
The run-time code never reads ``shared/``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def main(shared: Path, out: Path) -> None:
    shutil.copyfile(shared / "dolly" / "databricks-dolly-15k.jsonl.gz", out / "dolly-15k.jsonl.gz")

    with (out / "self-instruct-252.jsonl").open("w") as handle:
        for line in (shared / "self-instruct" / "user_oriented_instructions.jsonl").read_text().splitlines():
            raw = json.loads(line)
            (instance,) = raw["instances"]
            handle.write(json.dumps({"instruction": raw["instruction"], "context": instance["input"],
                                     "response": instance["output"], "category": raw["motivation_app"]}) + "\n")

    from fedpt.models.loading import load_tokenizer

    tokenizer = load_tokenizer("qwen2.5-coder-0.5b-instruct")
    references = {}
    for line in (shared / "superni" / "test_references.jsonl").read_text().splitlines():
        raw = json.loads(line)
        references[raw["id"]] = raw
    kept = total = 0
    with (out / "sni-test.jsonl").open("w") as handle:
        for task_file in sorted((shared / "superni" / "tasks").glob("*.json")):
            task = json.loads(task_file.read_text())
            for instance in task["Instances"]:
                ref = references.get(instance["id"])
                if ref is None:
                    continue
                total += 1
                if max(len(tokenizer(r)["input_ids"]) for r in ref["references"]) <= 11:
                    continue
                kept += 1
                handle.write(json.dumps({
                    "instruction": task["Definition"][0], "context": instance["input"],
                    "response": ref["references"][0], "references": ref["references"],
                    "category": task_file.stem,
                }) + "\n")
    print(f"S-NI: kept {kept} of {total} test instances (reference > 11 tokens)")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
