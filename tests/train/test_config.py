import pytest

from defocus_clip.errors import ConfigError
from defocus_clip.train.config import dump_recipe, list_recipes, load_recipe, parse_override


def test_every_shipped_recipe_loads():
    names = list_recipes()
    assert {"demo", "base32", "causal-mamba-b32", "vit-b32", "defocus-vit-b32", "defocus-retnet-b32"} <= set(names)
    for name in names:
        cfg = load_recipe(name, ["data.train_shards=/x/{0..1}.tar"] if name != "demo" else [])
        assert cfg.recipe == name


def test_base32_is_the_papers_recipe():
    cfg = load_recipe("base32")
    assert cfg.model.name == "DeFocus-Mamba-B-32"
    assert cfg.schedule.epochs == 32 and cfg.schedule.global_batch_size == 32768
    assert cfg.schedule.warmup_steps == 20000
    assert cfg.optim.lr == 5e-4 and cfg.optim.weight_decay == 0.1
    assert cfg.optim.betas == (0.9, 0.98) and cfg.optim.eps == 1e-6
    assert cfg.deepspeed.precision == "bf16"


def test_overrides_are_typed_and_dotted():
    cfg = load_recipe("demo", ["optim.lr=1e-3", "schedule.epochs=3", "optim.betas=[0.8, 0.9]",
                               "eval.datasets=wds/a,wds/b", "deepspeed.grad_clip=null"])
    assert cfg.optim.lr == 1e-3 and cfg.schedule.epochs == 3 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.eval.datasets == ["wds/a", "wds/b"] and cfg.deepspeed.grad_clip is None
    assert parse_override("a.b=3") == ("a.b", 3)


def test_resolved_recipe_round_trips(tmp_path):
    cfg = load_recipe("demo", ["optim.lr=3e-3"])
    path = tmp_path / "r.yaml"
    path.write_text(dump_recipe(cfg))
    again = load_recipe(path)
    again.recipe = cfg.recipe
    assert again == cfg


@pytest.mark.parametrize("override, message", [
    (["optim.lrr=1"], "unknown key(s) optim.lrr; valid keys in optim: betas, eps, lr, weight_decay"),
    (["bogus.x=1"], "unknown key(s) bogus"),
    (["schedule.epochs=two"], "schedule.epochs='two' must be an integer"),
    (["logging.tensorboard=3"], "must be true or false"),
    (["deepspeed.zero_stage=4"], "valid: 0, 1, 2, 3"),
    (["deepspeed.precision=fp8"], "valid: fp32, bf16, fp16"),
    (["data.source=wds", "data.train_shards=null"], "data.train_shards"),
    (["optim.betas=[0.9]"], "list of 2 values"),
    (["noequals"], "expected key=value"),
    (["model.compile=true", "deepspeed.zero_stage=3"], "not with deepspeed.zero_stage=3"),
])
def test_bad_values_name_what_is_valid(override, message):
    with pytest.raises(ConfigError) as e:
        load_recipe("demo", override)
    assert message in str(e.value)


def test_unknown_recipe_lists_known_ones():
    with pytest.raises(ConfigError, match=r"unknown recipe 'nope'.*base32.*demo"):
        load_recipe("nope")
