import pytest
import torch

from selecsls import create_model
from selecsls.train.recipes import RECIPES, WarmupCosine, build_optimizer, get_recipe
from training_fixtures import narrow_spec


@pytest.fixture(scope="module")
def model():
    return create_model(narrow_spec(), num_classes=3)


def _decay_of_bn_scales(optimizer, model):
    bn_scale = model.stem.bn.weight
    return next(g["weight_decay"] for g in optimizer.param_groups if any(p is bn_scale for p in g["params"]))


def test_sparsity_recipe_is_adam_with_l2_on_every_parameter(model):
    recipe = get_recipe("sparsity")
    optimizer = build_optimizer(model, recipe, recipe.lr, recipe.weight_decay)
    # torch.optim.Adam adds weight_decay * param to the gradient (coupled L2), unlike AdamW.
    assert type(optimizer) is torch.optim.Adam
    assert _decay_of_bn_scales(optimizer, model) == recipe.weight_decay > 0
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize("name, kind", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_other_recipes_exempt_norm_and_bias_from_decay(model, name, kind):
    recipe = RECIPES[name]
    optimizer = build_optimizer(model, recipe, recipe.lr, recipe.weight_decay)
    assert type(optimizer) is kind
    assert _decay_of_bn_scales(optimizer, model) == 0.0
    conv_weight = model.stem.conv.weight
    assert any(p is conv_weight for p in optimizer.param_groups[0]["params"])
    assert optimizer.param_groups[0]["weight_decay"] == recipe.weight_decay


def test_warmup_then_cosine_to_zero():
    schedule = WarmupCosine(warmup_steps=4, total_steps=14)
    factors = [schedule(step) for step in range(15)]
    assert factors[:4] == sorted(factors[:4]) and factors[0] == pytest.approx(0.2)
    assert factors[4] == pytest.approx(1.0)
    assert factors[9] == pytest.approx(0.5)
    assert factors[14] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))


def test_schedule_settings_travel_with_the_scheduler_state(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(2, 10))
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    restored = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(model.parameters(), lr=0.1), WarmupCosine(0, 1))
    restored.load_state_dict(state)
    assert restored.lr_lambdas[0].__dict__ == {"warmup_steps": 2, "total_steps": 10, "final": 0.0}
    assert restored.last_epoch == 3


def test_unknown_recipe_names_the_choices():
    with pytest.raises(ValueError, match="unknown recipe 'lamb'; choose one of sparsity, sgd, adamw"):
        get_recipe("lamb")


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_fused_cpu_update_equals_the_per_tensor_update(name):
    """On CPU the optimiser is built fused (one kernel per step) and updates as the per-tensor loop does."""
    recipe = RECIPES[name]
    models = [create_model(narrow_spec(), num_classes=3) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused, loop = (build_optimizer(m, recipe, recipe.lr, recipe.weight_decay) for m in models)
    assert all(group["fused"] for group in fused.param_groups)
    for group in loop.param_groups:
        group["fused"] = False
    for _ in range(3):
        for model, optimizer in zip(models, (fused, loop)):
            for p in model.parameters():
                p.grad = 0.1 + 0.01 * p.detach()
            optimizer.step()
    for (key, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=key)
