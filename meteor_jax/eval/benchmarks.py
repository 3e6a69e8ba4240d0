"""The benchmark registry: prompt suffix, ground-truth loading and scoring of a LLaVA-style answer file.

An answer file holds LLaVA answer records `{question_id, prompt, text, answer_id, model_id, metadata}` (`text` is the
model's free-text answer). Ground truth is a `.json` (a list of records, or a {question_id: record} object) or `.jsonl`
file, keyed by `str(question_id)`. `score(name, answers, ground_truth)` checks that every answer belongs to a
ground-truth question (else ValueError naming the ids) and at most one answer per question; ground-truth questions with
no answer are scored as wrong and counted as `missing`. Every result has `num_questions` (ground-truth questions),
`num_answered`, `missing` and the benchmark's main metric. Accuracies are fractions in [0, 1]; MME scores are in MME's
own points (per subtask (acc + acc+) * 100).

Ground-truth fields per benchmark (official field names where practical):

| benchmark | fields | metric |
|---|---|---|
| easy_vqa | `answer`, optional `question_type` | exact match after `vqa.normalize_answer` |
| vqav2, textvqa, vizwiz | `answers` (10 strings or [{"answer": ...}]), optional `answer_type`, `question_type` | VQA accuracy |
| gqa | `answer`, optional `types` ({structural, semantic}) or `question_type` | exact match |
| pope | `label` (or `answer`) yes/no, optional `category` (adversarial / popular / random) | F1, acc, P, R, yes-ratio |
| mme | `answer` Yes/No, `category` (subtask), `image` (pairs questions for acc+) | perception / cognition score |
| mmbench | `answer` letter; options as `options` (dict or list) or `A`..`D` fields; optional `circular_group` (or MMBench's `index`, rotations at index + k * 1e6); optional `category`, `l2-category` | circular accuracy |
| seed | `answer` letter, optional `options`/`choices` (default 4), `question_type_id`/`question_type` | accuracy |
| scienceqa | `answer` (choice index or letter), `choices`, optional `image` | accuracy |
| docvqa, infovqa | `answers` (list) or `answer` | ANLS |
| chartqa | `answer` (or `answers`), optional `type` (human_test / augmented_test) | relaxed accuracy |
| mmmu | `question_type` (multiple-choice / open), `answer`, `options` (or `index2ans` + `all_choices`), optional `subject` | accuracy |
| mmvet | none (GPT-graded outside: see write_mmvet_submission) | — |
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from collections import defaultdict
from typing import Callable, Iterable, Mapping, Sequence

from meteor_jax.eval import mmmu_scoring as mmmu
from meteor_jax.eval import scorers

ScoreFn = Callable[[Sequence[dict], Mapping[str, dict]], dict]

# ----------------------------------------------------------------------------------------------------------------------
# Prompt suffixes. LLaVA-1.5 (haotian-liu/LLaVA): the short-answer suffix is in its VQAv2, GQA, TextVQA, POPE and MME
# question files (llava_*.jsonl under playground/data/eval, as reproduced by lmms-eval's task configs, e.g. lmms-eval
# tasks/mme/utils.py strips MME's " Please answer yes or no." and appends it; LLaVA's TextVQA questions also carry a
# "Reference OCR token: ..." line before it, which belongs to the question text); VizWiz's two-line suffix is in its
# llava_test.jsonl (lmms-eval tasks/vizwiz_vqa/_default_template_vqa_yaml); the letter suffix is what
# llava/eval/model_vqa_mmbench.py and model_vqa_science.py append with --single-pred-prompt, and is in SEED's question
# file. LLaVA-1.5 does not evaluate DocVQA, InfoVQA, ChartQA or MMMU: for those the LLaVA-model defaults of lmms-eval
# are used (tasks/docvqa, tasks/infovqa, tasks/chartqa post_prompt = the short-answer suffix; tasks/mmmu/utils.py: the
# letter suffix for multiple-choice and the short-answer suffix for open questions), the convention behind the LLaVA
# numbers those papers report. MM-Vet is asked as is (scripts/v1_5/eval/mmvet.sh, no suffix).
# ----------------------------------------------------------------------------------------------------------------------
SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
VIZWIZ_ANSWER = "When the provided information is insufficient, respond with 'Unanswerable'.\n" + SHORT_ANSWER


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    prompt_suffix: str  # appended to the question as "\n" + suffix ("" for none)
    main_metric: str  # key of the headline number in score()'s result
    score: ScoreFn  # (answers, ground truth by question_id) -> metrics
    description: str  # one line: metric + ground-truth fields expected


# ----------------------------------------------------------------------------------------------------------------------
# Loading and aligning
# ----------------------------------------------------------------------------------------------------------------------

def load_ground_truth(path: str | os.PathLike) -> dict[str, dict]:
    """Ground truth by str(question_id) from a .json (list of records, or {question_id: record}) or .jsonl file."""
    path = os.fspath(path)
    records: list[tuple[str, str | None, dict]] = []  # (where, key from a {id: record} object, record)
    if path.endswith(".jsonl"):
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path} line {line_no}: not JSON ({e})") from e
                    records.append((f"{path} line {line_no}", None, record))
    elif path.endswith(".json"):
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, list):
            records = [(f"{path} record {i}", None, r) for i, r in enumerate(data)]
        elif isinstance(data, dict):
            records = [(f"{path} key {k!r}", str(k), r) for k, r in data.items()]
        else:
            raise ValueError(f"{path}: expected a list of records or a {{question_id: record}} object")
    else:
        raise ValueError(f"{path}: ground truth must be a .json or .jsonl file")

    out: dict[str, dict] = {}
    for where, key, record in records:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
        if key is None:
            if "question_id" not in record:
                raise ValueError(f"{where}: record has no question_id")
            key = str(record["question_id"])
        elif "question_id" in record and str(record["question_id"]) != key:
            raise ValueError(f"{where}: question_id {record['question_id']!r} differs from its key")
        if key in out:
            raise ValueError(f"{where}: duplicate question_id {key!r}")
        out[key] = dict(record, question_id=record.get("question_id", key))
    return out


def _answer_texts(answers: Sequence[dict], ground_truth: Mapping[str, dict]) -> dict[str, str]:
    """{question_id: answer text}, checking every answer names a ground-truth question, once."""
    texts: dict[str, str] = {}
    unknown, duplicate = [], []
    for answer in answers:
        if "question_id" not in answer:
            raise ValueError(f"answer record without question_id: {str(answer)[:200]}")
        qid = str(answer["question_id"])
        if qid not in ground_truth:
            unknown.append(qid)
        elif qid in texts:
            duplicate.append(qid)
        else:
            text = answer.get("text")
            if text is None:
                raise ValueError(f"answer for question {qid!r} has no `text`")
            texts[qid] = str(text)
    if unknown:
        raise ValueError(f"{len(unknown)} answer(s) for question ids not in the ground truth: {_few(unknown)}")
    if duplicate:
        raise ValueError(f"several answers for question id(s) {_few(duplicate)}")
    return texts


def _few(ids: Sequence[str], n: int = 10) -> str:
    return ", ".join(repr(i) for i in ids[:n]) + (f" ... ({len(ids)} in all)" if len(ids) > n else "")


def _field(record: Mapping, qid: str, *names: str):
    for name in names:
        if record.get(name) is not None:
            return record[name]
    raise ValueError(f"ground truth for question {qid!r} has no {' or '.join(repr(n) for n in names)} field")


def _base(ground_truth: Mapping[str, dict], texts: Mapping[str, str]) -> dict:
    return dict(num_questions=len(ground_truth), num_answered=len(texts), missing=len(ground_truth) - len(texts))


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def _breakdown(groups: Mapping[str, list[float]], key: str = "accuracy") -> dict:
    return {name: {key: _mean(v), "num_questions": len(v)} for name, v in sorted(groups.items())}


def _per_question(answers, ground_truth, judge: Callable[[str, dict, str | None], float],
                  group_fields: Mapping[str, Callable[[dict], str | None]] = {}, metric: str = "accuracy") -> dict:
    """Mean of judge(qid, record, text or None) over all ground-truth questions, with optional breakdowns."""
    texts = _answer_texts(answers, ground_truth)
    scores, groups = [], {out: defaultdict(list) for out in group_fields}
    for qid, record in ground_truth.items():
        s = float(judge(qid, record, texts.get(qid)))
        scores.append(s)
        view = record if "question_id" in record else {**record, "question_id": qid}
        for out, get in group_fields.items():
            name = get(view)
            if name is not None:
                groups[out][str(name)].append(s)
    result = _base(ground_truth, texts)
    result[metric] = _mean(scores)
    for out, by_name in groups.items():
        if by_name:
            result[out] = _breakdown(by_name, metric)
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Scorers
# ----------------------------------------------------------------------------------------------------------------------

def _score_easy_vqa(answers, ground_truth):
    from meteor_jax.eval.vqa import normalize_answer  # the demo's own normalisation

    def judge(qid, record, text):
        gold = _field(record, qid, "answer")
        return text is not None and normalize_answer(text) == normalize_answer(str(gold))
    return _per_question(answers, ground_truth, judge, {"per_question_type": lambda r: r.get("question_type")})


def _score_vqa(answers, ground_truth):
    def judge(qid, record, text):
        try:
            gold = scorers.vqa_gold_answers(record)
        except ValueError as e:
            raise ValueError(f"question {qid!r}: {e}") from None
        return scorers.vqa_accuracy(text, gold) if text is not None else 0.0
    return _per_question(answers, ground_truth, judge, {"per_answer_type": lambda r: r.get("answer_type"),
                                                        "per_question_type": lambda r: r.get("question_type")})


def _score_gqa(answers, ground_truth):
    def judge(qid, record, text):
        return text is not None and scorers.gqa_correct(text, _field(record, qid, "answer"))

    def types(kind):
        return lambda r: (r.get("types") or {}).get(kind) if isinstance(r.get("types"), dict) else None
    return _per_question(answers, ground_truth, judge, {"per_question_type": lambda r: r.get("question_type"),
                                                        "per_structural_type": types("structural"),
                                                        "per_semantic_type": types("semantic")})


def _score_pope(answers, ground_truth):
    texts = _answer_texts(answers, ground_truth)
    preds, labels = defaultdict(list), defaultdict(list)
    all_preds, all_labels = [], []
    for qid, record in ground_truth.items():
        label = str(_field(record, qid, "label", "answer")).strip().lower()
        if label not in ("yes", "no"):
            raise ValueError(f"POPE question {qid!r}: label must be yes or no, got {label!r}")
        text = texts.get(qid)
        # A missing answer is scored wrong: it is given the opposite of its label.
        pred = scorers.pope_parse_yes_no(text) if text is not None else ("no" if label == "yes" else "yes")
        category = str(record.get("category", "all"))
        preds[category].append(pred)
        labels[category].append(label)
        all_preds.append(pred)
        all_labels.append(label)
    per_category = {c: scorers.binary_metrics(preds[c], labels[c]) for c in sorted(preds)}
    result = _base(ground_truth, texts)
    # LLaVA-1.5 reports POPE as the mean over the three splits of each split's F1 (so are the other means here).
    for key in ("f1", "accuracy", "precision", "recall", "yes_ratio"):
        result[key] = _mean(m[key] for m in per_category.values())
    result["per_category"] = per_category
    result["overall"] = scorers.binary_metrics(all_preds, all_labels)  # pooled over all questions
    return result


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def _score_mme(answers, ground_truth):
    texts = _answer_texts(answers, ground_truth)
    by_task: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    others: dict[str, int] = defaultdict(int)
    for qid, record in ground_truth.items():
        gold = str(_field(record, qid, "answer")).strip().lower()
        if gold not in ("yes", "no"):
            raise ValueError(f"MME question {qid!r}: answer must be Yes or No, got {gold!r}")
        task, image = str(_field(record, qid, "category")), str(_field(record, qid, "image"))
        text = texts.get(qid)
        pred = scorers.mme_parse_yes_no(text) if text is not None else "other"
        others[task] += pred == "other"
        by_task[task][image].append(pred == gold)
    subtasks = {}
    for task, images in sorted(by_task.items()):
        answers_ok = [ok for oks in images.values() for ok in oks]
        acc = _mean(answers_ok)
        acc_plus = _mean(all(oks) for oks in images.values())  # every question of the image right
        subtasks[task] = dict(accuracy=acc, accuracy_plus=acc_plus, score=(acc + acc_plus) * 100,
                              num_questions=len(answers_ok), num_images=len(images), other=others[task])
    result = _base(ground_truth, texts)
    result["perception_score"] = sum(subtasks[t]["score"] for t in MME_PERCEPTION if t in subtasks)
    result["cognition_score"] = sum(subtasks[t]["score"] for t in MME_COGNITION if t in subtasks)
    result["total_score"] = result["perception_score"] + result["cognition_score"]
    result["subtasks"] = subtasks
    unknown = sorted(set(subtasks) - set(MME_PERCEPTION) - set(MME_COGNITION))
    if unknown:
        result["unknown_subtasks"] = unknown  # scored above, in neither total
    return result


def _mmbench_choices(qid, record) -> dict[str, str]:
    options = record.get("options")
    if isinstance(options, Mapping):
        return {str(k): str(v) for k, v in options.items() if not _is_none(v)}
    if isinstance(options, (list, tuple)):
        return {scorers.LETTERS[i]: str(v) for i, v in enumerate(options)}
    choices = {}
    for letter in scorers.LETTERS:  # MMBench tsv columns A, B, C, D: stop at the first empty one
        if _is_none(record.get(letter)):
            break
        choices[letter] = str(record[letter])
    if not choices:
        raise ValueError(f"MMBench question {qid!r} has no options (`options` or fields A, B, ...)")
    return choices


def _is_none(value) -> bool:
    return value is None or (isinstance(value, float) and value != value) or (
        isinstance(value, str) and value.strip().lower() in ("nan", "none", ""))


def _score_mmbench(answers, ground_truth):
    texts = _answer_texts(answers, ground_truth)
    groups: dict[str, list[bool]] = defaultdict(list)
    group_category: dict[str, dict] = {}
    per_category, per_l2 = defaultdict(list), defaultdict(list)
    unparsed = 0
    for qid, record in ground_truth.items():
        gold = str(_field(record, qid, "answer")).strip()
        text = texts.get(qid)
        pred = scorers.mmbench_can_infer(text, _mmbench_choices(qid, record)) if text is not None else None
        unparsed += text is not None and pred is None
        if record.get("circular_group") is not None:
            group = str(record["circular_group"])
        elif record.get("index") is not None:
            try:
                group = str(int(record["index"]) % 1_000_000)  # MMBench circular copies: index + k * 1e6
            except (TypeError, ValueError):
                raise ValueError(f"MMBench question {qid!r}: `index` must be an integer, got {record['index']!r}")
        else:
            group = qid
        groups[group].append(pred == gold)
        group_category.setdefault(group, record)
        per_category[str(record.get("category"))].append(pred == gold)
        per_l2[str(record.get("l2-category"))].append(pred == gold)
    result = _base(ground_truth, texts)
    result["circular_accuracy"] = _mean(all(oks) for oks in groups.values())
    result["single_pass_accuracy"] = _mean(oks[0] for oks in groups.values())  # the first-listed question of a group
    result["accuracy"] = _mean(ok for oks in groups.values() for ok in oks)  # every rotation counted alone
    result["num_groups"] = len(groups)
    result["unparsed"] = unparsed
    for out, field in (("per_category", "category"), ("per_l2_category", "l2-category")):
        circular = defaultdict(list)
        for group, oks in groups.items():
            if group_category[group].get(field) is not None:
                circular[str(group_category[group][field])].append(all(oks))
        if circular:
            result[out] = {name: {"circular_accuracy": _mean(v), "num_groups": len(v)}
                           for name, v in sorted(circular.items())}
    return result


def _score_letter_choice(gold_letter: Callable[[str, dict], str], num_choices: Callable[[dict], int],
                         group_fields: Mapping[str, Callable[[dict], str | None]] = {}) -> ScoreFn:
    def score_fn(answers, ground_truth):
        unparsed = 0
        img_scores = []

        def judge(qid, record, text):
            nonlocal unparsed
            if text is None:
                return False
            pred = scorers.llava_extract_letter(text, num_choices(record))
            unparsed += pred is None
            ok = pred is not None and pred == gold_letter(qid, record)
            if record.get("image"):
                img_scores.append(ok)
            return ok
        result = _per_question(answers, ground_truth, judge, group_fields)
        result["unparsed"] = unparsed
        return result, img_scores
    return score_fn


def _seed_gold(qid, record):
    return str(_field(record, qid, "answer")).strip()


def _num_options(record, default):
    options = record.get("options", record.get("choices"))
    return len(options) if isinstance(options, (list, tuple, Mapping)) else default


def _score_seed(answers, ground_truth):
    result, _ = _score_letter_choice(_seed_gold, lambda r: _num_options(r, 4), {
        "per_question_type": lambda r: r.get("question_type_id", r.get("question_type"))})(answers, ground_truth)
    return result


def _scienceqa_gold(qid, record):
    gold = _field(record, qid, "answer")
    return scorers.LETTERS[gold] if isinstance(gold, int) else str(gold).strip()


def _score_scienceqa(answers, ground_truth):
    result, img_scores = _score_letter_choice(_scienceqa_gold, lambda r: _num_options(r, 5))(answers, ground_truth)
    if img_scores:  # LLaVA's IMG-Accuracy: questions with an image (the ScienceQA-IMG number)
        result["img_accuracy"] = _mean(img_scores)
        result["num_img_questions"] = len(img_scores)
    return result


def _gold_list(qid, record, *names) -> list[str]:
    gold = _field(record, qid, *names)
    return [str(g) for g in gold] if isinstance(gold, (list, tuple)) else [str(gold)]


def _score_anls(answers, ground_truth):
    def judge(qid, record, text):
        return scorers.anls_score(text, _gold_list(qid, record, "answers", "answer")) if text is not None else 0.0
    return _per_question(answers, ground_truth, judge, {"per_question_type": lambda r: _first(r.get("question_types"))},
                         metric="anls")


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) and value else value


def _score_chartqa(answers, ground_truth):
    def judge(qid, record, text):
        return scorers.relaxed_accuracy(text, _gold_list(qid, record, "answer", "answers")) if text is not None else 0
    return _per_question(answers, ground_truth, judge, {"per_split": lambda r: r.get("type")},
                         metric="relaxed_accuracy")


MMMU_SEED = 42  # MMMU eval_utils.py's random.seed(42), here per question (see mmmu_scoring's docstring)


def _score_mmmu(answers, ground_truth):
    counts = dict(random_picks=0)

    def judge(qid, record, text):
        if text is None:
            return False
        gold = _field(record, qid, "answer")
        question_type = str(record.get("question_type", "multiple-choice"))
        if question_type == "multiple-choice":
            if record.get("index2ans") is not None:
                index2ans = {str(k): str(v) for k, v in record["index2ans"].items()}
                all_choices = list(record.get("all_choices") or index2ans)
            else:
                index2ans, all_choices = mmmu.multi_choice_info(mmmu.parse_options(_field(record, qid, "options")))
            rng = random.Random(f"{MMMU_SEED}:{qid}")
            pred, random_pick = mmmu.parse_multi_choice_response(text, all_choices, index2ans, rng)
            counts["random_picks"] += random_pick
            return mmmu.eval_multi_choice(gold, pred)
        if question_type == "open":
            return mmmu.eval_open(gold, mmmu.parse_open_response(text))
        raise ValueError(f"MMMU question {qid!r}: question_type must be multiple-choice or open, got {question_type!r}")

    def subject(record):
        if record.get("subject"):
            return record["subject"]
        parts = str(record.get("id", record.get("question_id", ""))).split("_")  # "validation_Art_Theory_12"
        return "_".join(parts[1:-1]) if len(parts) >= 3 else None

    result = _per_question(answers, ground_truth, judge, {"per_subject": subject,
                                                          "per_question_type": lambda r: r.get("question_type")})
    result["mc_random_picks"] = counts["random_picks"]
    return result


def _score_mmvet(answers, ground_truth):
    texts = _answer_texts(answers, ground_truth)
    result = _base(ground_truth, texts)
    result["graded_externally"] = True
    result["note"] = ("MM-Vet is graded by its GPT-4 grader (MM-Vet's official evaluator): write the submission file "
                      "with benchmarks.write_mmvet_submission and grade it there")
    return result


def write_mmvet_submission(answers: Sequence[dict], path: str | os.PathLike) -> dict[str, str]:
    """Write MM-Vet's submission file, a JSON object {"v1_<question_id>": answer text} (LLaVA's
    scripts/convert_mmvet_for_eval.py; an id that already starts with "v1_" is kept), and return it."""
    submission: dict[str, str] = {}
    for answer in answers:
        qid = str(answer["question_id"])
        key = qid if qid.startswith("v1_") else f"v1_{qid}"
        if key in submission:
            raise ValueError(f"several answers for MM-Vet question {key!r}")
        submission[key] = str(answer.get("text", ""))
    with open(path, "w") as f:
        json.dump(submission, f, indent=2, ensure_ascii=False)
    return submission


# ----------------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------------

_VQA_DESC = ("VQA accuracy (official normalisation, min(#matching annotators among the other 9 / 3, 1) averaged "
             "over the 10 leave-one-out subsets); ground truth: `answers` (10 strings or [{answer: ...}]), optional "
             "`answer_type`, `question_type`")

_ANLS_DESC = "ANLS (threshold 0.5, max over gold answers); ground truth: `answers` (list) or `answer`"

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("easy_vqa", "", "accuracy", _score_easy_vqa,
              "exact match after vqa.normalize_answer; ground truth: `answer`"),
    Benchmark("vqav2", SHORT_ANSWER, "accuracy", _score_vqa, _VQA_DESC),
    Benchmark("textvqa", SHORT_ANSWER, "accuracy", _score_vqa, _VQA_DESC),
    Benchmark("vizwiz", VIZWIZ_ANSWER, "accuracy", _score_vqa, _VQA_DESC),
    Benchmark("gqa", SHORT_ANSWER, "accuracy", _score_gqa,
              "exact match of text.rstrip('.').lower() (LLaVA + official GQA eval); ground truth: `answer`, optional "
              "`types` {structural, semantic} or `question_type`"),
    Benchmark("pope", SHORT_ANSWER, "f1", _score_pope,
              "F1 (mean over categories, as LLaVA-1.5 reports), accuracy, precision, recall, yes-ratio per category and "
              "pooled; LLaVA eval_pope yes/no parsing; ground truth: `label` (or `answer`) yes/no, optional `category`"),
    Benchmark("mme", SHORT_ANSWER, "perception_score", _score_mme,
              "MME score: per subtask (acc + acc+) * 100, perception (10 subtasks) and cognition (4) totals; ground "
              "truth: `answer` Yes/No, `category` (subtask), `image` (pairs the two questions of an image)"),
    Benchmark("mmbench", LETTER_ANSWER, "circular_accuracy", _score_mmbench,
              "circular accuracy (a question group is right only if every rotation is), single-pass and per-category; "
              "VLMEvalKit can_infer extraction; ground truth: `answer` letter, `options` (or A..D fields), "
              "`circular_group` (or `index`), optional `category`, `l2-category`"),
    Benchmark("seed", LETTER_ANSWER, "accuracy", _score_seed,
              "multiple-choice accuracy, LLaVA letter extraction; ground truth: `answer` letter, optional `options` "
              "(default 4), `question_type_id`"),
    Benchmark("scienceqa", LETTER_ANSWER, "accuracy", _score_scienceqa,
              "multiple-choice accuracy (use the IMG subset for ScienceQA-IMG; img_accuracy over records with an "
              "`image`), LLaVA eval_science_qa letter extraction; ground truth: `answer` (index or letter), `choices`"),
    Benchmark("docvqa", SHORT_ANSWER, "anls", _score_anls, _ANLS_DESC),
    Benchmark("infovqa", SHORT_ANSWER, "anls", _score_anls, _ANLS_DESC),
    Benchmark("chartqa", SHORT_ANSWER, "relaxed_accuracy", _score_chartqa,
              "relaxed accuracy (numbers within 5% of the target, else case-insensitive exact match); ground truth: "
              "`answer`, optional `type` (human_test / augmented_test)"),
    Benchmark("mmmu", LETTER_ANSWER, "accuracy", _score_mmmu,
              "MMMU eval_utils parsing and judging (multiple-choice + open), micro-averaged accuracy; ground truth: "
              "`question_type`, `answer`, `options` (or `index2ans`/`all_choices`), optional `subject`; open questions "
              "take the short-answer suffix (prompt_suffix_for)"),
    Benchmark("mmvet", "", "graded_externally", _score_mmvet,
              "GPT-graded outside (write_mmvet_submission writes {v1_<id>: answer}); score() only counts the answers"),
]}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def prompt_suffix_for(name: str, record: Mapping) -> str:
    """The suffix for one question: the benchmark's, except MMMU open questions, which take the short-answer one."""
    benchmark = get_benchmark(name)
    if name == "mmmu" and str(record.get("question_type", "multiple-choice")) == "open":
        return SHORT_ANSWER
    return benchmark.prompt_suffix


def score(name: str, answers: Sequence[dict], ground_truth: Mapping[str, dict]) -> dict:
    """Score LLaVA answer records against ground truth (see the module docstring for the fields)."""
    return get_benchmark(name).score(answers, ground_truth)
