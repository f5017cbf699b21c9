import json

import pytest

from fedpt.config import DataConfig
from fedpt.data.partition import partition_examples
from fedpt.data.prompts import IGNORE_INDEX, encode_sft
from fedpt.data.records import check_disjoint, load_examples, split_examples, Splits
from fedpt.errors import FedPTError


def test_builtin_split_is_disjoint_and_stratified():
    examples = load_examples("builtin:dolly-tiny")
    splits = split_examples(examples, eval_size=16, kd_pool_size=32, seed=1)
    assert len(splits.eval) == 16 and len(splits.kd_pool) == 32
    assert len({ex.category for ex in splits.eval}) == 8  # every Dolly category represented
    assert all(ex.response == "" for ex in splits.kd_pool)  # the server sees instructions only
    keys = [{ex.key for ex in s} for s in (splits.train, splits.eval, splits.kd_pool)]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert split_examples(examples, 16, 32, seed=1) == splits  # deterministic


def test_disjointness_check_catches_overlap():
    examples = load_examples("builtin:dolly-tiny")[:10]
    with pytest.raises(FedPTError, match="device data and eval share 1"):
        check_disjoint(Splits(train=examples[:3], eval=examples[2:4], kd_pool=[]))


def test_broken_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"instruction": "a", "response": "b"})
    path.write_text(f"{good}\n{good}\n{{not json\n")
    with pytest.raises(FedPTError, match=rf"{path}:3: not valid JSON"):
        load_examples(str(path))
    path.write_text(f"{good}\n" + json.dumps({"instruction": "a"}) + "\n")
    with pytest.raises(FedPTError, match=rf"{path}:2: missing 'response'"):
        load_examples(str(path))


def test_partitions_cover_training_data_once():
    splits = split_examples(load_examples("builtin:dolly-tiny"), 16, 32, seed=1)
    for partitioner in ("iid", "dirichlet"):
        cfg = DataConfig(partitioner=partitioner, dirichlet_alpha=0.5)
        parts = [partition_examples(splits.train, 4, i, cfg, seed=3) for i in range(4)]
        assert sum(len(p) for p in parts) == len(splits.train)
        assert {ex.key for p in parts for ex in p} == {ex.key for ex in splits.train}


def test_empty_partition_is_an_error():
    splits = split_examples(load_examples("builtin:dolly-tiny"), 16, 32, seed=1)
    with pytest.raises(FedPTError, match="partition is empty"):
        partition_examples(splits.train[:5], 8, 7, DataConfig(partitioner="iid"), seed=0)


def test_sft_labels_mask_the_prompt(tiny_pair):
    tokenizer = tiny_pair[0]
    ids, labels = encode_sft(tokenizer, "### Instruction:\nSay hi\n\n### Response:\n", "hi there", 64, 96)
    n_prompt = len(tokenizer("### Instruction:\nSay hi\n\n### Response:\n")["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tokenizer.eos_token_id


def test_csv_with_field_mapping(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question,answer,topic\nWhat is 2+2?,4,math\n\"Name a colour\",red,art\n")
    examples = load_examples(str(path), ["instruction=question", "response=answer", "category=topic"])
    assert [(e.instruction, e.response, e.category) for e in examples] == [
        ("What is 2+2?", "4", "math"), ("Name a colour", "red", "art")]
    with pytest.raises(FedPTError, match=rf"{path}:2: missing or empty 'instruction'"):
        load_examples(str(path))  # without the mapping the columns are unknown
    path.write_text("question,answer\nok,fine\nbad,row,extra\n")
    with pytest.raises(FedPTError, match=rf"{path}:3: more cells"):
        load_examples(str(path), ["instruction=question", "response=answer"])
    with pytest.raises(FedPTError, match="data.fields entry 'prompt=question'"):
        load_examples(str(path), ["prompt=question"])


def test_extra_eval_sets_must_not_overlap_device_data_or_kd_pool(tmp_path):
    from fedpt.config import load_config
    from fedpt.server import load_eval_sets, load_splits

    cfg = load_config(preset="tiny")
    splits = load_splits(cfg)
    leaked = tmp_path / "leak.jsonl"
    ex = splits.kd_pool[0]
    leaked.write_text(json.dumps({"instruction": ex.instruction, "context": ex.context, "response": "x"}) + "\n")
    cfg.data.eval_sets = [str(leaked)]
    with pytest.raises(FedPTError, match="KD pool and eval set leak share 1"):
        load_eval_sets(cfg, splits)
    real = load_config(preset="qwen-cpu")  # the default job's sets: disjoint by construction, checked here
    sets = load_eval_sets(real, load_splits(real))
    assert list(sets) == ["dolly-15k", "self-instruct", "sni"] and all(len(v) == 8 for v in sets.values())


def test_saved_hf_dataset_with_field_mapping(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"q": ["Say hi", "Count to 3"], "a": ["hi", "1 2 3"], "input": ["", ""]}).save_to_disk(
        str(tmp_path / "ds"))
    examples = load_examples(str(tmp_path / "ds"), ["instruction=q", "response=a"])
    assert [(e.instruction, e.response) for e in examples] == [("Say hi", "hi"), ("Count to 3", "1 2 3")]
