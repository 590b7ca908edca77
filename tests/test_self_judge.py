"""OSP's self-preferring judge (judges.SelfPreferringJudge): the policy's own next-token preference between two
of its completions, against float64 from the definition (one unpadded forward per comparison text), and the
online loop training on its soft labels."""
import copy
import math

import pytest
import torch
import transformers

from prefops.training import config as C, judges
from prefops.training.online import OnlineTrainer
from prefops.training.tokenizer import CharTokenizer
from test_online import make_config

TEMPLATE, ANSWERS = "{prompt}{a}={b}=", ["1", "2"]


def expected_preference(model, tokenizer, prompt, a, b):
    """½ [σ(z_1 - z_2 | a first) + σ(z_2 - z_1 | b first)] in float64, one sequence at a time, no padding."""
    model64 = copy.deepcopy(model).double().eval()
    first, second = (tokenizer.encode(x, add_special_tokens=False)[0] for x in ANSWERS)

    def first_preferred(x, y):
        ids = torch.tensor([tokenizer.encode(TEMPLATE.format(prompt=prompt, a=x, b=y))])
        z = model64(input_ids=ids).logits[0, -1]
        return 1 / (1 + math.exp(-(z[first].item() - z[second].item())))
    with torch.no_grad():
        return 0.5 * (first_preferred(a, b) + 1 - first_preferred(b, a))


def tiny_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      pad_token_id=tokenizer.pad_token_id, initializer_range=0.5)
    # Large weights: preferences far from ½ that depend on the texts, so that a wrong one shows.
    return transformers.LlamaForCausalLM(config).double()


def test_self_judge_matches_its_definition_in_float64():
    tokenizer = CharTokenizer("0123456789=")
    judge = judges.make_judge("self", self_judge=dict(tokenizer=tokenizer, template=TEMPLATE, answers=ANSWERS),
                              batch_size=3)  # several batches, rows of different lengths: padding matters
    judge.model = tiny_model(tokenizer)
    prompts = ["3141=", "27="]
    completions = [["1134", "4311", "13", "9"], ["27", "72", "2", "7777777"]]
    prefs = judge.preferences(prompts, completions)
    assert judge.calls == 2 * 6
    for p, prompt in enumerate(prompts):
        for i in range(4):
            for j in range(4):
                if i != j:
                    want = expected_preference(judge.model, tokenizer, prompt, completions[p][i], completions[p][j])
                    assert prefs[p, i, j].item() == pytest.approx(want, rel=1e-10, abs=1e-12), (p, i, j)
    assert 0.05 < prefs[~torch.eye(4, dtype=torch.bool).expand(2, 4, 4)].std(), "a judge of all-½ tests nothing"


@pytest.mark.parametrize("options, message", [
    (dict(answers=["1", "12"]), "answer '12' must be one token"),
    (dict(answers=["1", "x"]), "answer 'x' must be one token"),  # not in the alphabet: the unknown token
    (dict(template="{prompt}{a}="), r"\{b\} is missing"),
])
def test_self_judge_refuses_what_it_cannot_read(options, message):
    with pytest.raises(judges.JudgeError, match=message):
        judges.make_judge("self", self_judge={"tokenizer": CharTokenizer("0123456789="), "template": TEMPLATE,
                                              "answers": ANSWERS, **options})


def test_online_trains_on_the_policys_own_soft_labels(tmp_path):
    """Each round's pairs carry P(chosen > rejected) by the policy of that round, as defined above."""
    config = make_config(tmp_path, loss_type="sigmoid", online={
        "judge": "self", "soft_labels": True, "rounds": 2, "prompts_per_round": 4,
        "self_judge_template": TEMPLATE, "self_judge_answers": ANSWERS})
    trainer = OnlineTrainer(config)
    checked = []
    new_round = trainer.new_round

    def checking(index, ref):
        current = new_round(index, ref)  # the policy has not trained on it yet: it is the judge that labelled it
        for record in current.records:
            want = expected_preference(trainer.model, trainer.tokenizer, record.prompt, *record.completions)
            # fp32 forward against float64: each logit is off by ~1e-6 of its size
            assert record.preference_prob == pytest.approx(want, abs=1e-4)
            checked.append(record.preference_prob)
        return current
    trainer.new_round = checking
    trainer.train()
    assert checked and all(p >= 0.5 for p in checked)


@pytest.mark.parametrize("online, message", [
    ({"judge": ["self", "task"]}, "online.judge self judges alone"),
    ({"judge": "self", "self_judge_template": "{a} {b}"}, "self_judge_template must be a string holding"),
    ({"judge": "self", "self_judge_answers": ["A", "A"]}, "self_judge_answers must be two different"),
])
def test_self_judge_config_errors(tmp_path, online, message):
    with pytest.raises(C.ConfigError, match=message):
        make_config(tmp_path, online=online)
