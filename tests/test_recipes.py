"""Recipes (finetune/recipes/*.yaml) and `finetune.py --config FILE`.

The launch scripts now name a recipe instead of carrying a block of flags. The main test replays
every script with sets of user flags and environments and checks that finetune.py resolves the
same effective settings as it did before the recipes existed (tests/fixtures/launch_resolution.json,
recorded from the earlier scripts; how: tests/launch_helpers.py). Fast: nothing trains.
"""

from __future__ import annotations

import json
from pathlib import Path

import launch_helpers as helpers
import pytest

from qwen_finetune.args import parse_args
from qwen_finetune.errors import ArgumentError

REFERENCE = json.loads((helpers.REPO_ROOT / "tests" / "fixtures" / "launch_resolution.json").read_text())
RECIPES = helpers.REPO_ROOT / "finetune" / "recipes"

# Recorded as given, not an effective setting: the earlier scripts passed --evaluation_strategy no
# (its effect, eval_strategy "no", is compared); the recipes set eval_strategy itself. `config`
# did not exist before: it names the recipe.
NOT_COMPARED = {"training": {"evaluation_strategy", "config"}}
# Defaults changed on purpose since the reference was recorded: (group, name) -> (then, now). The
# original's AdamW loop now runs fused (the same update in one pass per tensor); --optim still wins.
CHANGED_DEFAULTS = {("training", "optim"): ("adamw_torch", "adamw_torch_fused")}


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> dict[str, tuple[helpers.Launched | None, dict]]:
    """Every reference case run through today's scripts and parser: name -> (launch, settings);
    "defaults" -> (None, the settings of an empty command line)."""
    workdir = tmp_path_factory.mktemp("launch")
    python = helpers.write_fake_python(workdir / "bin")
    launches: dict[str, helpers.Launched | None] = {"defaults": None}
    argvs: list[list[str]] = [[]]
    for case in REFERENCE["cases"]:
        args = ["-m", "M", "-d", "D", *helpers.with_checkout(case["args"], helpers.REPO_ROOT)]
        launched = helpers.launch(
            helpers.REPO_ROOT / "finetune" / case["script"], args, workdir, python=python, **case["env"]
        )
        assert launched.argv is not None, launched.completed.stderr
        launches[case["name"]] = launched
        argvs.append(helpers.split_command(launched.argv)[1])
    for item in REFERENCE["direct"]:
        launches[item["name"]] = None
        argvs.append(helpers.with_checkout(item["argv"], helpers.REPO_ROOT))
    settings = helpers.resolve(argvs, helpers.REPO_ROOT)
    return {
        name: (launched, result) for (name, launched), result in zip(launches.items(), settings, strict=True)
    }


def assert_same_settings(expected: dict, actual: dict, defaults: dict) -> None:
    assert "error" not in actual, actual
    for group, values in expected.items():
        skip = NOT_COMPARED.get(group, set())
        compared = {name: value for name, value in values.items() if name not in skip}
        for (changed_group, name), (then, now) in CHANGED_DEFAULTS.items():
            if changed_group == group and compared.get(name) == then:
                compared[name] = now
        assert {name: actual[group].get(name) for name in compared} == compared, group
        # flags added since the reference was recorded must keep their defaults
        added = set(actual[group]) - set(values) - skip
        assert {name: actual[group][name] for name in added} == {
            name: defaults[group][name] for name in added
        }


@pytest.fixture(scope="module")
def today_defaults(resolved) -> dict:
    return resolved["defaults"][1]


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=[case["name"] for case in REFERENCE["cases"]])
def test_launch_scripts_resolve_as_before(case, resolved, today_defaults):
    launched, settings = resolved[case["name"]]
    launcher, finetune_args = helpers.split_command(launched.argv)
    assert launcher == [item.replace("{checkout}", str(helpers.REPO_ROOT)) for item in case["launcher"]]
    assert launched.environment.get("CUDA_VISIBLE_DEVICES") == case["cuda_visible_devices"]
    assert finetune_args[0] == "--config" and [
        Path(name).parent for name in settings["training"]["config"]
    ] == [RECIPES]
    assert_same_settings(helpers.overlay(REFERENCE["defaults"], case["settings"]), settings, today_defaults)


@pytest.mark.parametrize("item", REFERENCE["direct"], ids=[item["name"] for item in REFERENCE["direct"]])
def test_original_flags_given_to_finetune_py_resolve_as_before(item, resolved, today_defaults):
    """`torchrun ... finetune.py <the original flag list>` without any recipe."""
    _, settings = resolved[item["name"]]
    assert settings["training"]["config"] == []
    assert_same_settings(helpers.overlay(REFERENCE["defaults"], item["settings"]), settings, today_defaults)


# ------------------------------------------------------------------------------------------ --config


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_command_line_overrides_the_config_and_later_configs_override_earlier(tmp_path):
    base = write(tmp_path / "base.yaml", "learning_rate: 3e-4\nnum_train_epochs: 2\nuse_lora: true\n")
    extra = write(tmp_path / "extra.json", json.dumps({"num_train_epochs": 4, "lora_r": 8}))
    _, _, training, lora = parse_args(["--config", str(base), str(extra), "--lora_r", "16"])
    assert training.learning_rate == pytest.approx(3e-4)  # YAML reads 3e-4 as text: still a number here
    assert training.num_train_epochs == 4 and lora.use_lora and lora.lora_r == 16
    assert training.config == [str(base), str(extra)]
    _, _, training, _ = parse_args([f"--config={base}", "--learning_rate", "1e-5", f"--config={extra}"])
    assert training.learning_rate == pytest.approx(1e-5) and training.num_train_epochs == 4


def test_extends_chain_and_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "root.yaml", "weight_decay: 0.1\nlearning_rate: 1.0e-5\n")
    write(tmp_path / "sub" / "mid.yaml", "extends: ../root.yaml\nlearning_rate: 2.0e-5\n")
    leaf = write(tmp_path / "leaf.yaml", "extends: sub/mid.yaml\nlora_target_modules: [c_attn, w2]\n")
    _, _, training, lora = parse_args(["--config", str(leaf)])
    assert (training.weight_decay, training.learning_rate) == (0.1, 2e-5)
    assert lora.lora_target_modules == ["c_attn", "w2"]


def test_shipped_recipes_differ_only_where_their_runs_differ():
    _, _, full, full_lora = parse_args(["--config", str(RECIPES / "full.yaml")])
    _, _, lora, lora_lora = parse_args(["--config", str(RECIPES / "lora.yaml")])
    _, _, qlora, qlora_lora = parse_args(["--config", str(RECIPES / "qlora.yaml")])
    assert (full.learning_rate, lora.learning_rate) == (1e-5, 3e-4)
    assert not full_lora.use_lora and lora_lora.use_lora and qlora_lora.q_lora and qlora_lora.use_lora
    assert (lora.bf16, lora.fp16, qlora.bf16, qlora.fp16) == (True, False, False, True)
    for args in (full, lora, qlora):
        assert args.model_max_length == 512 and args.activation_checkpointing and args.eval_strategy == "no"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("learning_rat: 1e-4\n", "unknown key 'learning_rat'; did you mean 'learning_rate'?"),
        ("use_lora: 1\n", "use_lora must be true or false, got 1"),
        ("eval_strategy: no\n", "quote the word"),
        ("save_total_limit: ten\n", "save_total_limit must be a whole number, got 'ten'"),
        ("lora_r: 8.5\n", "lora_r must be a whole number"),
        ("learning_rate: fast\n", "learning_rate must be a number, got 'fast'"),
        ("lora_bias: some\n", "lora_bias is 'some'; choose one of none, all, lora_only"),
        ("output_dir: [a, b]\n", "output_dir takes one value, got a list"),
        ("lora_target_modules: []\n", "lora_target_modules is an empty list"),
        ("seed:\n", "seed has no value"),
        ("verbose: true\n", "give --verbose"),
        ("lora_r: 8\nlora_r: 16\n", "'lora_r' is set twice (again at line 2)"),
        ("- lora_r\n", "expected 'flag_name: value' lines"),
        ("lora_r: [8\n", "invalid YAML"),
        ("extends: 3\n", "'extends' must be a file name"),
    ],
)
def test_config_errors_name_the_key_and_the_file(tmp_path, text, expected):
    config = write(tmp_path / "recipe.yaml", text)
    with pytest.raises(ArgumentError) as error:
        parse_args(["--config", str(config)])
    assert expected in str(error.value) and str(config) in str(error.value)


def test_missing_files_circular_extends_and_bad_json(tmp_path):
    with pytest.raises(ArgumentError, match="no such file"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(ArgumentError, match="--config needs a file"):
        parse_args(["--config", "--use_lora"])
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ArgumentError, match="goes round in a circle"):
        parse_args(["--config", str(tmp_path / "a.yaml")])
    broken = write(tmp_path / "broken.json", '{"lora_r": 8,}')
    with pytest.raises(ArgumentError, match="invalid JSON at line 1"):
        parse_args(["--config", str(broken)])
    twice = write(tmp_path / "twice.json", '{"lora_r": 8, "lora_r": 4}')
    with pytest.raises(ArgumentError, match="'lora_r' is set twice"):
        parse_args(["--config", str(twice)])
