"""bAbI qa1-qa5: parser, simulator (replay of the released test files) and generator."""
import os

import pytest
from conftest import SHARED_DATA

from eval.babi import (TASK_LABELS, BabiWorld, babi_path, babi_samples, format_babi, generate_babi, parse_babi,
                       read_babi, replay_stories, task_number)

BABI_DIR = os.path.join(SHARED_DATA, "babi", "en")
needs_babi = pytest.mark.skipif(not os.path.isdir(BABI_DIR), reason=f"offline bAbI files not at {BABI_DIR}")


@needs_babi
@pytest.mark.parametrize("task", [1, 2, 3, 4, 5])
def test_simulator_replays_released_test_files(task):
    # evals.md §1.8: 100% answer agreement on qa1-qa4, >= 99.8% on qa5, no rule violations
    stories = read_babi(babi_path(task, "test", SHARED_DATA))
    report = replay_stories(stories)
    assert report["questions"] == 1000
    assert report["violations"] == []
    if task < 5:
        assert report["agree"] == 1000, report["mismatches"][:3]
    else:
        assert report["accuracy"] >= 0.998, report["mismatches"][:3]


def test_parse_and_format_round_trip():
    text = ("1 Mary moved to the bathroom.\n2 John went to the hallway.\n3 Where is Mary? \tbathroom\t1\n"
            "1 The hallway is east of the bathroom.\n2 The bedroom is west of the bathroom.\n"
            "3 What is the bathroom east of?\tbedroom\t2\n")
    stories = parse_babi(text)
    assert [len(s) for s in stories] == [3, 3]
    question = stories[0][2]
    assert question.is_question and question.text == "Where is Mary?" and question.answer == "bathroom"
    assert question.supports == (1,)
    assert parse_babi(format_babi(stories)) == stories


@pytest.mark.parametrize("bad", ["Mary moved to the bathroom.\n", "1 Mary moved.\n3 John went to the office.\n",
                                 "1 Where is Mary?\tbathroom\tone\n"])
def test_parse_rejects_malformed_lines(bad):
    with pytest.raises(ValueError):
        parse_babi(bad)


def test_task_number_and_paths():
    assert task_number("qa3") == task_number(3) == 3
    with pytest.raises(ValueError, match="unknown bAbI task"):
        task_number("qa6")
    with pytest.raises(ValueError, match="split"):
        babi_path(1, "valid", SHARED_DATA)
    with pytest.raises(FileNotFoundError):
        read_babi("/nonexistent/qa1_test.txt")


def test_samples_take_earlier_statements_only():
    stories = parse_babi("1 Mary moved to the bathroom.\n2 John went to the hallway.\n3 Where is Mary?\tbathroom\t1\n"
                         "4 Mary went to the garden.\n5 Sandra went to the office.\n6 Where is Mary?\tgarden\t4\n")
    first, second = babi_samples(stories)
    assert first["facts"] == ["Mary moved to the bathroom.", "John went to the hallway."]
    assert second["facts"][-2:] == ["Mary went to the garden.", "Sandra went to the office."]
    assert len(second["facts"]) == 4 and second["support"] == [2] and second["answer"] == "garden"


def test_simulator_reports_rule_violations():
    world = BabiWorld()
    world.apply("Mary went to the kitchen.", 1)
    world.apply("Mary moved to the kitchen.", 2)            # already there
    world.apply("John dropped the milk.", 3)                # not holding it
    world.apply("Sandra went to the garden.", 4)
    world.apply("Sandra took the apple there.", 5)
    world.apply("Sandra passed the apple to Mary.", 6)      # Mary is in the kitchen
    assert len(world.violations) == 3
    assert world.answer("Where is the apple?")[0] == "kitchen"   # Mary holds it now
    assert world.answer("Who received the apple?") == ("Mary", [6])


@pytest.mark.parametrize("task", [1, 2, 3, 4, 5])
def test_generator_is_deterministic_and_follows_the_rules(task):
    stories = generate_babi(task, 40, seed=7)
    assert format_babi(stories) == format_babi(generate_babi(task, 40, seed=7))
    assert format_babi(stories) != format_babi(generate_babi(task, 40, seed=8))
    # through text and back, then the independent checks of the simulator: every answer
    # reproduced, no rule broken, the story shapes of §1.8
    report = replay_stories(parse_babi(format_babi(stories)))
    assert report["violations"] == [] and report["agree"] == report["questions"]
    for story in stories:
        questions = [line for line in story if line.is_question]
        assert len(questions) == (1 if task == 4 else 5)
        assert all(q.answer in TASK_LABELS[f"qa{task}"] for q in questions)
        statements_before = [sum(not line.is_question for line in story[:q.id]) for q in questions]
        assert all(n % 2 == 0 for n in statements_before)
        if task == 1:
            assert len(story) == 15


def test_generated_splits_share_no_seed():
    """split='test' draws from its own stream: no seed's train stories are another seed's
    test stories (the training seeds fine-tuning walks through cover every integer)."""
    test = {format_babi([story]) for story in generate_babi(2, 20, seed=0, split="test")}
    for seed in range(0, 3):
        assert not test & {format_babi([story]) for story in generate_babi(2, 20, seed=seed)}
    assert format_babi(generate_babi(2, 3, seed=5)) == format_babi(generate_babi(2, 3, seed=5, split="train"))
    with pytest.raises(ValueError, match="^bAbI split must be 'train' or 'test', got 'dev'$"):
        generate_babi(2, 1, split="dev")

def test_generated_training_samples_mix_verbs():
    texts = " ".join(line.text for story in generate_babi(2, 30, seed=0) for line in story)
    for verb in ("journeyed", "travelled", "went back", "picked up", "put down"):
        assert verb in texts


def test_read_babi_names_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "qa1_test.txt"
    path.write_bytes(b"1 Mary moved to the bathroom.\n2 Where is Mary? \tbathr\xf6om\t1\n")
    with pytest.raises(ValueError, match=rf"^{path} is not UTF-8 text \(byte 0xf6 at offset 53\)$"):
        read_babi(str(path))
