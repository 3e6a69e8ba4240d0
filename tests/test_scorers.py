"""Benchmark scorers and registry: small hand-computed cases (the arithmetic is in the comments)."""
import json
import random

import pytest

from meteor_jax.eval import benchmarks, mmmu_scoring, scorers
from meteor_jax.eval.benchmarks import load_ground_truth, score

EXACT = dict(abs=1e-12)  # hand-computed fractions, compared up to float rounding only


def ans(qid, text):
    return dict(question_id=qid, prompt="q", text=text, answer_id="x", model_id="m", metadata={})


# ---------------------------------------------------------------------------------------------------------------------
# VQA normalisation and accuracy
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("two", "2"), ("Two", "2"), ("none", "0"),        # number words → digits
    ("a dog", "dog"), ("the red car", "red car"),     # articles dropped
    ("dont", "don't"), ("don't", "don't"),            # contractions table; an apostrophe is not punctuation
    ("Dog.", "dog"), ("yes!", "yes"), ("why?", "why"),  # trailing punctuation
    ("2.5", "2.5"),                                   # a period before a digit stays
    ("1,000", "1000"),                                # digit,digit comma: every mark deleted, not spaced
    ("black-and-white", "black and white"),           # a mark touching no space becomes a space
    ("black - white", "black white"),                 # a mark touching a space is deleted
    ("  tall\tman\n", "tall man"),
])
def test_vqa_normalize(raw, expected):
    assert scorers.vqa_normalize(raw) == expected


@pytest.mark.parametrize("matches, expected", [
    (0, 0.0),
    # 1 match: leaving out the matching annotator → 0/3; leaving out any of the 9 others → 1/3. (0 + 9/3) / 10 = 0.3
    (1, 0.3),
    # 2 matches: each matching one left out → 1/3 (x2); others left out → 2/3 (x8). (2/3 + 16/3) / 10 = 18/30 = 0.6
    (2, 0.6),
    # 3 matches: matching left out → 2/3 (x3); others → min(3/3, 1) = 1 (x7). (2 + 7) / 10 = 0.9
    (3, 0.9),
    # 4 matches: every subset still has >= 3 matches → 1
    (4, 1.0),
])
def test_vqa_accuracy_leave_one_out(matches, expected):
    gold = ["dog"] * matches + ["cat"] * (10 - matches)
    assert scorers.vqa_accuracy("dog", gold) == pytest.approx(expected, **EXACT)


def test_vqa_accuracy_normalises_both_sides():
    # "Two." → "2" matches 3 annotators' "2" (0.9); "an apple" matches "apple" x10 (1.0)
    assert scorers.vqa_accuracy("Two.", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9, **EXACT)
    assert scorers.vqa_accuracy("an apple", ["apple"] * 10) == 1.0
    assert scorers.vqa_accuracy("dont know", ["don't know"] * 2 + ["no"] * 8) == pytest.approx(0.6, **EXACT)
    with pytest.raises(ValueError, match="at least 2"):
        scorers.vqa_accuracy("dog", ["dog"])


def test_score_vqav2_official_answer_dicts_types_and_missing():
    gt = {
        "1": dict(answers=[{"answer": "2", "answer_id": i} for i in range(3)]
                  + [{"answer": "3", "answer_id": i} for i in range(3, 10)], answer_type="number"),
        "2": dict(answers=["yes"] * 10, answer_type="yes/no"),
        "3": dict(answers=["red"] * 10, answer_type="other"),  # no answer given: scored 0, counted missing
    }
    result = score("vqav2", [ans(1, "Two"), ans("2", "no")], gt)
    # q1: 3 of 10 match → 0.9; q2: 0; q3: missing → 0. (0.9 + 0 + 0) / 3 = 0.3
    assert result["accuracy"] == pytest.approx(0.3, **EXACT)
    assert (result["num_questions"], result["num_answered"], result["missing"]) == (3, 2, 1)
    assert result["per_answer_type"]["number"]["accuracy"] == pytest.approx(0.9, **EXACT)
    assert result["per_answer_type"]["yes/no"]["accuracy"] == 0.0
    assert result["per_answer_type"]["other"] == {"accuracy": 0.0, "num_questions": 1}


# ---------------------------------------------------------------------------------------------------------------------
# GQA, easy_vqa
# ---------------------------------------------------------------------------------------------------------------------

def test_gqa_exact_match():
    assert scorers.gqa_correct("Yes.", "yes")
    assert not scorers.gqa_correct("the table", "table")  # no article removal in GQA
    gt = {"a": dict(answer="left", types=dict(structural="query", semantic="rel")),
          "b": dict(answer="no", types=dict(structural="verify", semantic="attr"))}
    result = score("gqa", [ans("a", "Left."), ans("b", "yes")], gt)
    assert result["accuracy"] == 0.5  # 1 of 2
    assert result["per_structural_type"]["query"]["accuracy"] == 1.0
    assert result["per_structural_type"]["verify"]["accuracy"] == 0.0


def test_easy_vqa_exact_match():
    gt = {"0": dict(answer="red"), "1": dict(answer="circle"), "2": dict(answer="blue")}
    result = score("easy_vqa", [ans(0, " Red."), ans(1, "square"), ans(2, "Blue")], gt)
    assert result["accuracy"] == pytest.approx(2 / 3, **EXACT)
    assert "per_question_type" not in result  # no question_type in the ground truth: no breakdown
    for qid, kind in (("0", "colour"), ("1", "shape"), ("2", "colour")):
        gt[qid]["question_type"] = kind
    result = score("easy_vqa", [ans(0, " Red."), ans(1, "square"), ans(2, "green")], gt)
    assert result["per_question_type"] == {"colour": {"accuracy": 0.5, "num_questions": 2},
                                           "shape": {"accuracy": 0.0, "num_questions": 1}}


# ---------------------------------------------------------------------------------------------------------------------
# POPE and MME
# ---------------------------------------------------------------------------------------------------------------------

def test_pope_parsing():
    assert scorers.pope_parse_yes_no("No, there is not.") == "no"
    assert scorers.pope_parse_yes_no("There is no cat.") == "no"
    assert scorers.pope_parse_yes_no("Yes. No doubt") == "yes"  # only the first sentence counts
    assert scorers.pope_parse_yes_no("NO") == "yes"  # eval_pope.py matches "No"/"no"/"not" exactly
    assert scorers.pope_parse_yes_no("") == "yes"


def test_pope_confusion_matrix():
    labels = ["yes", "yes", "yes", "no", "no", "no", "yes", "no"]
    texts = ["Yes, there is.", "Yes", "No, there is not.", "Yes.", "No.", "There is no cat.", "No", "No"]
    cats = ["random"] * 6 + ["popular"] * 2
    gt = {str(i): dict(label=label, category=c) for i, (label, c) in enumerate(zip(labels, cats))}
    result = score("pope", [ans(i, t) for i, t in enumerate(texts)], gt)
    rnd = result["per_category"]["random"]
    # random: preds yes yes no | yes no no vs labels yes yes yes | no no no → TP 2, FN 1, FP 1, TN 2
    assert (rnd["tp"], rnd["fn"], rnd["fp"], rnd["tn"]) == (2, 1, 1, 2)
    assert rnd["precision"] == pytest.approx(2 / 3, **EXACT)  # 2 / (2 + 1)
    assert rnd["recall"] == pytest.approx(2 / 3, **EXACT)  # 2 / (2 + 1)
    assert rnd["f1"] == pytest.approx(2 / 3, **EXACT)  # 2 * (2/3)(2/3) / (4/3)
    assert rnd["accuracy"] == pytest.approx(4 / 6, **EXACT)
    assert rnd["yes_ratio"] == 0.5  # 3 of 6 predicted yes
    pop = result["per_category"]["popular"]
    # popular: label yes → "No" (FN), label no → "No" (TN): no positives predicted → precision = recall = F1 = 0
    assert (pop["tp"], pop["fn"], pop["fp"], pop["tn"]) == (0, 1, 0, 1)
    assert pop["f1"] == 0.0 and pop["accuracy"] == 0.5
    assert result["f1"] == pytest.approx((2 / 3 + 0) / 2, **EXACT)  # mean over categories
    overall = result["overall"]  # pooled: TP 2, FP 1, TN 3, FN 2
    assert overall["precision"] == pytest.approx(2 / 3, **EXACT)
    assert overall["recall"] == pytest.approx(2 / 4, **EXACT)
    assert overall["f1"] == pytest.approx(4 / 7, **EXACT)  # 2 * (2/3)(1/2) / (2/3 + 1/2) = (2/3) / (7/6)
    assert overall["accuracy"] == pytest.approx(5 / 8, **EXACT)


def test_pope_missing_answer_is_wrong():
    gt = {"0": dict(label="yes"), "1": dict(label="no")}
    result = score("pope", [ans(0, "Yes")], gt)
    # the missing "no" question is counted as a wrong yes: TP 1, FP 1 → accuracy 1/2, precision 1/2, recall 1
    assert result["missing"] == 1
    assert result["accuracy"] == 0.5 and result["precision"] == 0.5 and result["recall"] == 1.0


def test_mme_parsing():
    assert scorers.mme_parse_yes_no("Yes, it is") == "yes"
    assert scorers.mme_parse_yes_no("no.") == "no"
    assert scorers.mme_parse_yes_no("The answer is yes") == "other"  # nothing in the first 4 characters


def test_mme_acc_plus_and_totals():
    gt = {
        "1": dict(category="existence", image="e1.jpg", answer="Yes"),
        "2": dict(category="existence", image="e1.jpg", answer="No"),
        "3": dict(category="existence", image="e2.jpg", answer="Yes"),
        "4": dict(category="existence", image="e2.jpg", answer="No"),
        "5": dict(category="code_reasoning", image="c1.png", answer="Yes"),
        "6": dict(category="code_reasoning", image="c1.png", answer="No"),
    }
    texts = {"1": "Yes", "2": "No", "3": "Yes", "4": "yes", "5": "I am not sure"}  # 6 missing
    result = score("mme", [ans(q, t) for q, t in texts.items()], gt)
    existence = result["subtasks"]["existence"]
    # e1 both right, e2 one wrong: acc = 3/4, acc+ = 1/2 (one image of two fully right); score = (0.75 + 0.5) * 100
    assert existence["accuracy"] == 0.75 and existence["accuracy_plus"] == 0.5
    assert existence["score"] == pytest.approx(125.0, **EXACT)
    code = result["subtasks"]["code_reasoning"]
    assert code["score"] == 0.0 and code["other"] == 2  # "i am" parses to other; the missing one too
    assert result["perception_score"] == pytest.approx(125.0, **EXACT)
    assert result["cognition_score"] == 0.0
    assert result["total_score"] == pytest.approx(125.0, **EXACT)
    assert len(benchmarks.MME_PERCEPTION) == 10 and len(benchmarks.MME_COGNITION) == 4


# ---------------------------------------------------------------------------------------------------------------------
# Multiple choice: MMBench, SEED, ScienceQA
# ---------------------------------------------------------------------------------------------------------------------

def test_mmbench_can_infer():
    choices = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}
    assert scorers.mmbench_can_infer("B", choices) == "B"
    assert scorers.mmbench_can_infer("The answer is (C).", choices) == "C"
    assert scorers.mmbench_can_infer("It is a dog", choices) == "B"  # content match ("a" is not the letter "A")
    assert scorers.mmbench_can_infer("A or B", choices) is None  # two letters and no option text: failed
    assert scorers.mmbench_can_infer("hot dog", {"A": "dog", "B": "hot dog"}) is None  # two contents: ambiguous


def test_mmbench_circular():
    options = ["cat", "dog", "bird", "fish"]
    gt, texts = {}, {}
    # Group 7: four rotations (MMBench indices 7 + k * 1e6) with the right option rotating through A..D; the 3rd fails.
    for k in range(4):
        qid = f"g7r{k}"
        rotated = options[k:] + options[:k]
        gold = "ABCD"[rotated.index("dog")]
        gt[qid] = dict(index=7 + k * 1_000_000, options=rotated, answer=gold, category="animals")
        texts[qid] = gold if k != 2 else "ABCD"[rotated.index("cat")]
    # Group "g9" (explicit circular_group): two rotations, both right.
    gt["g9r0"] = dict(circular_group="g9", A="yes", B="no", answer="A", category="logic")
    gt["g9r1"] = dict(circular_group="g9", A="no", B="yes", answer="B", category="logic")
    texts.update(g9r0="A", g9r1="B")
    result = score("mmbench", [ans(q, t) for q, t in texts.items()], gt)
    assert result["num_groups"] == 2
    assert result["single_pass_accuracy"] == 1.0  # both groups' first questions are right
    assert result["accuracy"] == pytest.approx(5 / 6, **EXACT)  # 5 of 6 questions
    assert result["circular_accuracy"] == 0.5  # group 7 fails on one rotation: 1 of 2 groups
    assert result["per_category"]["animals"]["circular_accuracy"] == 0.0
    assert result["per_category"]["logic"]["circular_accuracy"] == 1.0


@pytest.mark.parametrize("text, n, expected", [
    ("A", 4, "A"), ("B. blue", 4, "B"), ("The answer is C.", 4, "C"), (" D ", 4, "D"),
    ("I think D", 4, None), ("E", 4, None), ("E", 5, "E"), ("The answer is A. The answer is B.", 4, None),
])
def test_llava_letter_extraction(text, n, expected):
    assert scorers.llava_extract_letter(text, n) == expected


def test_seed_and_scienceqa():
    gt = {"1": dict(answer="A", question_type_id=1), "2": dict(answer="B", question_type_id=1),
          "3": dict(answer="C", question_type_id=2)}
    result = score("seed", [ans(1, "A"), ans(2, "The answer is B."), ans(3, "no idea")], gt)
    assert result["accuracy"] == pytest.approx(2 / 3, **EXACT) and result["unparsed"] == 1
    assert result["per_question_type"]["2"]["accuracy"] == 0.0

    gt = {"s1": dict(answer=1, choices=["x", "y"], image="a.png"),  # gold index 1 → "B"
          "s2": dict(answer=0, choices=["x", "y", "z"]),
          "s3": dict(answer=2, choices=["x", "y", "z"], image="b.png")}
    result = score("scienceqa", [ans("s1", "B"), ans("s2", "A. x"), ans("s3", "D")], gt)  # "D" beyond 3 choices
    assert result["accuracy"] == pytest.approx(2 / 3, **EXACT) and result["unparsed"] == 1
    assert result["img_accuracy"] == 0.5 and result["num_img_questions"] == 2  # s1 right, s3 wrong


# ---------------------------------------------------------------------------------------------------------------------
# ANLS, ChartQA
# ---------------------------------------------------------------------------------------------------------------------

def test_levenshtein():
    assert scorers.levenshtein("kitten", "sitting") == 3
    assert scorers.levenshtein("", "abc") == 3 and scorers.levenshtein("abc", "abc") == 0


def test_anls():
    # one substitution in a 10-character answer: NL = 1/10 → 1 - 0.1 = 0.9
    assert scorers.anls_score("abcdefghik", ["abcdefghij"]) == pytest.approx(0.9, **EXACT)
    assert scorers.anls_score("  Hello   WORLD ", ["hello world"]) == 1.0  # case and whitespace ignored
    # NL = 2/4 = 0.5 is not < 0.5 → 0; NL = 3/4 → 0
    assert scorers.anls_score("abxy", ["abcd"]) == 0.0
    assert scorers.anls_score("axyz", ["abcd"]) == 0.0
    assert scorers.anls_score("abcdefghik", ["zzzz", "abcdefghij"]) == pytest.approx(0.9, **EXACT)  # max over golds
    gt = {"1": dict(answers=["abcdefghij"]), "2": dict(answers=["abcd"]), "3": dict(answer="x")}
    result = score("docvqa", [ans(1, "abcdefghik"), ans(2, "abxy")], gt)
    assert result["anls"] == pytest.approx(0.9 / 3, **EXACT)  # (0.9 + 0 + 0 missing) / 3


@pytest.mark.parametrize("target, prediction, expected", [
    ("200", "210", True),       # |210 - 200| / 200 = 0.05: exactly 5% is in
    ("200", "190", True),       # 10 / 200 = 0.05
    ("200", "210.01", False),   # 10.01 / 200 = 0.05005 > 0.05
    ("200", "189.9", False),    # 10.1 / 200 = 0.0505
    ("50%", "0.52", True),      # 50% → 0.5; |0.52 - 0.5| / 0.5 = 0.04
    ("0", "0.0", False),        # a zero target falls back to string equality ("0.0" != "0")
    ("Yes", " yes ", True),     # text: case-insensitive exact match (prediction stripped)
    ("Yes", "yes.", False),
])
def test_chartqa_relaxed_correctness(target, prediction, expected):
    assert scorers.relaxed_correctness(target, prediction) is expected


def test_chartqa_score():
    gt = {"1": dict(answer="200", type="human_test"), "2": dict(answer="Blue", type="augmented_test")}
    result = score("chartqa", [ans(1, "209"), ans(2, "red")], gt)
    assert result["relaxed_accuracy"] == 0.5
    assert result["per_split"]["human_test"]["relaxed_accuracy"] == 1.0


# ---------------------------------------------------------------------------------------------------------------------
# MMMU
# ---------------------------------------------------------------------------------------------------------------------

def test_mmmu_multi_choice_parsing():
    index2ans = {"A": "red car", "B": "blue car", "C": "bus", "D": "train"}
    choices = list("ABCD")
    assert mmmu_scoring.parse_multi_choice_response("The answer is (B).", choices, index2ans) == ("B", False)
    assert mmmu_scoring.parse_multi_choice_response("B", choices, index2ans) == ("B", False)
    # several bare letters: the last one in the response wins
    assert mmmu_scoring.parse_multi_choice_response("A and B are wrong, C is right", choices, index2ans) == ("C", False)
    # more than 5 words and no letter: option content
    assert mmmu_scoring.parse_multi_choice_response("I believe it shows the blue car here", choices,
                                                    index2ans) == ("B", False)
    # nothing parses: a random letter, the same for the same seed
    first = mmmu_scoring.parse_multi_choice_response("no idea", choices, index2ans, random.Random("42:q1"))
    again = mmmu_scoring.parse_multi_choice_response("no idea", choices, index2ans, random.Random("42:q1"))
    assert first == again and first[1] is True and first[0] in choices


def test_mmmu_open_parsing():
    assert mmmu_scoring.parse_open_response("The answer is 3.14") == [3.14]  # shortest tail after "is "/"answer "
    assert mmmu_scoring.parse_open_response("So the capital is Paris.") == ["paris"]
    parsed = mmmu_scoring.parse_open_response("It costs 1,000 dollars")
    assert 1000.0 in parsed  # "1,000" → 1000.0
    assert mmmu_scoring.eval_open("1000", parsed)
    assert mmmu_scoring.eval_open("3.1400", [3.14])  # numbers compared after rounding to 2 decimals
    assert mmmu_scoring.eval_open("Paris", ["paris"])
    assert not mmmu_scoring.eval_open("22", [3.14])
    assert mmmu_scoring.eval_open("['7', '3.5']", [3.5])  # list-valued gold in its string form


def test_mmmu_score():
    gt = {
        "validation_Art_1": dict(question_type="multiple-choice", options="['red', 'blue']", answer="B"),
        "validation_Art_2": dict(question_type="multiple-choice", options=["red", "blue"], answer="A"),
        "validation_Math_1": dict(question_type="open", answer="12"),
        "validation_Math_2": dict(question_type="open", answer="5"),
    }
    texts = {"validation_Art_1": "(B)", "validation_Art_2": "B", "validation_Math_1": "The result is 12."}
    result = score("mmmu", [ans(q, t) for q, t in texts.items()], gt)
    assert result["accuracy"] == 0.5  # Art_1 right, Art_2 wrong, Math_1 right, Math_2 missing
    assert result["per_subject"]["Art"]["accuracy"] == 0.5 and result["per_subject"]["Math"]["accuracy"] == 0.5
    assert result["mc_random_picks"] == 0
    random_pick = score("mmmu", [ans("validation_Art_2", "hmm")], {"validation_Art_2": gt["validation_Art_2"]})
    assert random_pick["mc_random_picks"] == 1
    assert random_pick == score("mmmu", [ans("validation_Art_2", "hmm")], {"validation_Art_2": gt["validation_Art_2"]})


# ---------------------------------------------------------------------------------------------------------------------
# Registry, loading, errors, MM-Vet
# ---------------------------------------------------------------------------------------------------------------------

_MINIMAL = {  # one ground-truth record and a right answer per benchmark
    "easy_vqa": (dict(answer="red"), "red"),
    "vqav2": (dict(answers=["cat"] * 10), "cat"),
    "textvqa": (dict(answers=["stop"] * 10), "STOP"),
    "vizwiz": (dict(answers=["unanswerable"] * 10), "Unanswerable"),
    "gqa": (dict(answer="left"), "left"),
    "pope": (dict(label="no", category="random"), "No"),
    "mme": (dict(answer="Yes", category="color", image="x.jpg"), "Yes"),
    "mmbench": (dict(answer="A", options={"A": "cat", "B": "dog"}), "A"),
    "seed": (dict(answer="C"), "C"),
    "scienceqa": (dict(answer=0, choices=["a", "b"]), "A"),
    "docvqa": (dict(answers=["$1,000"]), "$1,000"),
    "infovqa": (dict(answers=["42"]), "42"),
    "chartqa": (dict(answer="3.5"), "3.5"),
    "mmmu": (dict(question_type="multiple-choice", options=["x", "y"], answer="A"), "A"),
    "mmvet": (dict(), "a picture of a dog"),
}


def test_registry_names_and_suffixes():
    assert sorted(benchmarks.BENCHMARKS) == sorted(_MINIMAL)
    assert benchmarks.get_benchmark("vqav2").prompt_suffix == "Answer the question using a single word or phrase."
    assert benchmarks.get_benchmark("vizwiz").prompt_suffix == (
        "When the provided information is insufficient, respond with 'Unanswerable'.\n"
        "Answer the question using a single word or phrase.")
    for name in ("mmbench", "seed", "scienceqa"):
        assert benchmarks.get_benchmark(name).prompt_suffix == (
            "Answer with the option's letter from the given choices directly.")
    assert benchmarks.get_benchmark("easy_vqa").prompt_suffix == ""
    assert benchmarks.prompt_suffix_for("mmmu", {"question_type": "open"}) == benchmarks.SHORT_ANSWER
    with pytest.raises(ValueError, match="unknown benchmark 'nope'.*vqav2"):
        benchmarks.get_benchmark("nope")
    with pytest.raises(ValueError, match="known:"):
        score("nope", [], {})


@pytest.mark.parametrize("name", sorted(_MINIMAL))
def test_every_benchmark_reports_its_main_metric(name):
    record, right = _MINIMAL[name]
    benchmark = benchmarks.get_benchmark(name)
    assert benchmark.description
    result = score(name, [ans("q0", right)], {"q0": dict(record), "q1": dict(record)})
    assert result["num_questions"] == 2 and result["missing"] == 1
    main = result[benchmark.main_metric]
    if name == "mmvet":
        assert main is True
    elif name == "mme":
        # color: one image, its two questions: 1 right, 1 missing → acc 0.5, acc+ 0 → 50 points
        assert main == pytest.approx(50.0, **EXACT)
    elif name == "pope":
        # TN 1 and the missing "no" counted as a wrong yes (FP 1): no true positive → F1 0, but accuracy 1/2
        assert main == 0.0 and result["accuracy"] == 0.5
    else:
        assert main == pytest.approx(0.5, **EXACT)  # one right answer, one missing


def test_bad_answers_raise():
    gt = {"1": dict(answer="red"), "2": dict(answer="blue")}
    with pytest.raises(ValueError, match=r"not in the ground truth: '99'"):
        score("easy_vqa", [ans(1, "red"), ans(99, "x")], gt)
    with pytest.raises(ValueError, match=r"several answers for question id\(s\) '1'"):
        score("easy_vqa", [ans(1, "red"), ans("1", "red")], gt)
    with pytest.raises(ValueError, match="no `text`"):
        score("easy_vqa", [dict(question_id=1)], gt)
    with pytest.raises(ValueError, match="question '1': ground truth needs a non-empty `answers` list"):
        score("vqav2", [ans(1, "red")], {"1": dict(answer="red")})


def test_load_ground_truth_json_and_jsonl(tmp_path):
    records = [dict(question_id=1, answer="red"), dict(question_id="b", answer="blue")]
    as_list = tmp_path / "gt.json"
    as_list.write_text(json.dumps(records))
    as_dict = tmp_path / "gt_dict.json"
    as_dict.write_text(json.dumps({"1": dict(answer="red"), "b": dict(question_id="b", answer="blue")}))
    as_lines = tmp_path / "gt.jsonl"
    as_lines.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    for path in (as_list, as_dict, as_lines):
        gt = load_ground_truth(path)
        assert list(gt) == ["1", "b"] and gt["b"]["answer"] == "blue"
        assert score("easy_vqa", [ans(1, "Red"), ans("b", "green")], gt)["accuracy"] == 0.5


def test_load_ground_truth_errors(tmp_path):
    no_id = tmp_path / "no_id.jsonl"
    no_id.write_text(json.dumps(dict(question_id=1)) + "\n" + json.dumps(dict(answer="x")) + "\n")
    with pytest.raises(ValueError, match=r"no_id.jsonl line 2: record has no question_id"):
        load_ground_truth(no_id)
    duplicate = tmp_path / "dup.json"
    duplicate.write_text(json.dumps([dict(question_id=5), dict(question_id="5")]))
    with pytest.raises(ValueError, match=r"dup.json record 1: duplicate question_id '5'"):
        load_ground_truth(duplicate)
    mismatch = tmp_path / "mismatch.json"
    mismatch.write_text(json.dumps({"1": dict(question_id=2)}))
    with pytest.raises(ValueError, match="differs from its key"):
        load_ground_truth(mismatch)
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl line 1: not JSON"):
        load_ground_truth(bad_line)
    with pytest.raises(ValueError, match="must be a .json or .jsonl"):
        load_ground_truth(tmp_path / "gt.csv")


def test_mmvet_submission(tmp_path):
    path = tmp_path / "mmvet.json"
    answers = [ans(0, "A dog."), ans("v1_1", "Two")]
    written = benchmarks.write_mmvet_submission(answers, path)
    assert json.loads(path.read_text()) == written == {"v1_0": "A dog.", "v1_1": "Two"}
    result = score("mmvet", answers, {"0": {}, "v1_1": {}, "2": {}})
    assert result["graded_externally"] is True and result["missing"] == 1 and result["num_questions"] == 3
    with pytest.raises(ValueError, match="several answers"):
        benchmarks.write_mmvet_submission([ans(0, "a"), ans("v1_0", "b")], tmp_path / "dup.json")
