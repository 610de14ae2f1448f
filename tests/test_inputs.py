"""One message for every bad input: one line naming the problem and the fix, exit 2, no traceback, before any
model loads; config errors are reported before torch is imported.

The first tests run the real command line in subprocesses (a representative subset: config, YAML syntax, data,
command line, environment); the rest call the same checks in-process, which is fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gen_rl import inputs
from gen_rl.core import hub
from gen_rl.core.config import ConfigError, load_config, parse_overrides, read_yaml
from gen_rl.data import DataError, load_prompts
from gen_rl.train import cli, task_of
from gen_rl.trainer_config import GenerationConfig

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo" / "tiny_flux_cpu.yaml"
PROMPTS = ROOT / "configs" / "demo" / "prompts" / "colour_train.txt"
# Runs gen_rl/train.py as __main__ and reports on stdout, at exit, whether torch was ever imported.
RUN_CLI = (
    "import atexit, runpy, sys; "
    "atexit.register(lambda: print('TORCH_IMPORTED' if 'torch' in sys.modules else 'TORCH_NOT_IMPORTED')); "
    "sys.argv = ['gen_rl/train.py', *sys.argv[1:]]; runpy.run_path('gen_rl/train.py', run_name='__main__')"
)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real command line in a fresh interpreter, from the repository root, offline."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", RUN_CLI, *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_clean_line(result: subprocess.CompletedProcess, message: str, torch_free: bool = True) -> str:
    """Exit 2, exactly one stderr line ``error: ...`` containing ``message``, no traceback, and (for every
    config, generation-data and environment error) torch never imported."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert ("TORCH_NOT_IMPORTED" in result.stdout) or not torch_free
    return lines[0]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """Files the subprocess cases point at: a tab-indented YAML, a latin-1 prompt file, a VLM JSONL."""
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "tabs.yaml").write_text("task: generation\ntrain:\n\tlr: 1.0e-4\n")
    (root / "latin1.txt").write_bytes("a red apple\na caf\xe9 in blue\n".encode("latin-1"))
    (root / "a_file").write_text("not a folder\n")
    images = root / "images"
    images.mkdir()
    (images / "ok.png").write_bytes(b"not decoded at start-up")
    records = [
        {"id": "r1", "image": "ok.png", "problem": "colour?", "solution": "red"},
        {"id": "r2", "image": "missing.png", "problem": "colour?", "solution": "blue"},
    ]
    (root / "vlm.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return root


def subprocess_cases(files: Path) -> dict[str, tuple[list[str], dict[str, str], str]]:
    """name -> (command-line arguments, extra environment, expected part of the message)."""
    demo = ["--config", str(DEMO), f"log.output_dir={files / 'run'}", "log.tracker=none"]
    vlm_stage = f"data.stages=[{{files: [{files / 'vlm.jsonl'}]}}]"
    return {
        "typo": ([*demo, "train.lrr=1e-4"], {}, "unknown config key 'train.lrr'. Did you mean 'train.lr'?"),
        "tab_yaml": (
            ["--config", str(files / "tabs.yaml")],
            {},
            f"{files / 'tabs.yaml'}:3:1: a tab character",
        ),
        "negative_lr": ([*demo, "train.lr=-1e-4"], {}, "train.lr must be > 0"),
        "nan_lr": ([*demo, "train.lr=.nan"], {}, "train.lr is nan; give a finite number"),
        "group_of_one": ([*demo, "sample.group_size=1"], {}, "sample.group_size is 1: "),
        "wandb": ([*demo, "log.tracker=wandb"], {}, "log.tracker is 'wandb' but wandb is not installed"),
        "output_under_file": (
            [*demo, f"log.output_dir={files / 'a_file' / 'run'}"],
            {},
            f"log.output_dir {files / 'a_file' / 'run'} cannot be made",
        ),
        "latin1_prompts": (
            [*demo, f"data.train_prompts={files / 'latin1.txt'}"],
            {},
            f"prompt file {files / 'latin1.txt'} (data.train_prompts) is not UTF-8 text (line 2",
        ),
        "hub_model_offline": (
            [*demo, "model.pretrained=no-such-owner/no-such-model"],
            {},
            "'no-such-owner/no-such-model' is not in the local hub cache and HF_HUB_OFFLINE=1 is set",
        ),
        "image_size": ([*demo, "sample.height=15"], {}, "sample.height is 15, but 'tiny:flux-pixel' (flux)"),
        "flag_typo": ([*demo, "--resmue"], {}, "unrecognized arguments: --resmue"),
        "vlm_missing_image": (
            [
                "--config",
                str(ROOT / "configs" / "vlm" / "tiny_colour_cpu.yaml"),
                f"log.output_dir={files / 'vlm_run'}",
                f"data.image_root={files / 'images'}",
                vlm_stage,
            ],
            {},
            f"{files / 'vlm.jsonl'}:2: {files / 'images' / 'missing.png'} does not exist (record 'r2')",
        ),
        "vlm_missing_file": (
            [
                "--config",
                str(ROOT / "configs" / "vlm" / "tiny_colour_cpu.yaml"),
                f"log.output_dir={files / 'vlm_run'}",
                f"data.stages=[{{files: [{files / 'nope.jsonl'}]}}]",
            ],
            {},
            f"data file {files / 'nope.jsonl'} (data.stages[0].files[0]) does not exist",
        ),
    }


SUBPROCESS_CASES = list(subprocess_cases(Path("/x")))


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_the_command_line_prints_one_line_before_torch(name, bad_files):
    if name == "wandb" and _installed("wandb"):
        pytest.skip("wandb is installed here")
    args, env, message = subprocess_cases(bad_files)[name]
    torch_free = name != "vlm_missing_image"  # gen_rl.vlm.data imports torch (after the config is checked)
    assert_one_clean_line(run_cli(*args, env=env), message, torch_free)


def test_debug_shows_the_traceback(bad_files):
    result = run_cli("--config", str(DEMO), "train.lrr=1", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr
    assert "ConfigError: unknown config key 'train.lrr'" in result.stderr


def test_a_config_error_is_reported_well_under_a_second():
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "gen_rl/train.py", "--config", str(DEMO), "train.lrr=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert elapsed < 5.0, f"{elapsed:.1f} s: something heavy is imported before validation"  # idle: ~0.1 s


# ----- the CLI in-process: exit code and one line ---------------------------------------------------------------
def cli_error(capsys, *args: str) -> str:
    """Run ``cli`` in-process; assert exit 2 and exactly one stderr line; return it."""
    assert cli(list(args)) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_multi_line_library_messages_are_joined_to_one_line(capsys, monkeypatch):
    def fail(config):
        raise ConfigError("first line\n  second line")

    monkeypatch.setattr(inputs, "check_generation_inputs", fail)
    line = cli_error(capsys, "--config", str(DEMO), "log.tracker=none")
    assert line == "error: first line second line"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train.lr=1e-4"], "--config is required"),
        (["--config", "no/such.yaml"], f"config file {ROOT / 'no' / 'such.yaml'} does not exist"),
        (["--config", str(DEMO), "train.lr"], "override 'train.lr' must look like section.key=value"),
        (["--config", str(DEMO), "train.lr=[1"], "override 'train.lr=[1': the value is not valid YAML"),
        (
            ["--config", str(DEMO), "task=video"],
            "task must be 'generation', 'vlm', 'reward_model' or 'unified', got 'video'",
        ),
        (["--config", str(DEMO), "reward.terms=[{name:colour}]"], "YAML needs a space after the colon"),
        (["--config", str(DEMO), "--resume", "--resume=yes"], "ignored explicit argument 'yes'"),
    ],
)
def test_command_line_mistakes(capsys, monkeypatch, args, message):
    monkeypatch.chdir(ROOT)
    assert message in cli_error(capsys, *args)


# ----- YAML files -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "train:\n  lr: 1\n\tseed: 2\n",
            ":3:1: a tab character in the indentation; YAML indents with spaces only",
        ),
        ("train: [1, 2\nsample: {}\n", ":2:7: YAML syntax error: expected ',' or ']'"),
        ("train:\n  lr: 1\n  lr: 2\n", ":3:3: duplicate key 'lr' (YAML keeps only the last one); remove one"),
        ("train:\n  lr: 1\n seed: 2\n", ":3:2: YAML syntax error: expected <block end>, but found"),
        (
            "train:\n  lr: 1\n  seed: 2 x: 3\n",
            ":3:12: YAML syntax error: mapping values are not allowed here",
        ),
        ("- train\n- sample\n", "must hold a mapping of sections, got list"),
        (
            "x: !!python/object/apply:os.system [ls]\n",
            ":1:4: the tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed",
        ),
    ],
)
def test_yaml_errors_name_file_line_and_column(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        read_yaml(path)
    assert str(error.value).startswith(str(path)) or f"config file {path}" in str(error.value)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_config_file_that_is_not_utf8_or_a_folder(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"train:\n  lr: 1 # \xe9\n")
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(bad byte at offset 17\); save it as UTF-8"):
        read_yaml(path)
    with pytest.raises(ConfigError, match="is not a file"):
        read_yaml(tmp_path)


def test_yaml_reads_1e_minus_5_as_a_number():
    config = load_config(GenerationConfig, None, [f"data.train_prompts={PROMPTS}"])
    from gen_rl.core.config import from_dict

    assert from_dict(type(config.train), {"lr": "1e-5"}).lr == 1e-5  # PyYAML gives the string '1e-5'
    with pytest.raises(ConfigError, match="train.lr must be float, got 'nan'"):
        from_dict(GenerationConfig, {"train": {"lr": "nan"}})


def test_overrides_that_conflict():
    with pytest.raises(ConfigError, match="conflicts with an earlier override of 'train'"):
        parse_overrides(["train=5", "train.lr=1"])


# ----- values ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=0", "train.lr must be > 0"),
        ("train.lr=.inf", "train.lr is inf; give a finite number"),
        ("train.adam_eps=.nan", "train.adam_eps is nan"),
        ("reward.terms=[{name: colour, kwargs: {scale: .nan}}]", "reward.terms[0].kwargs.scale is nan"),
        ("sample.group_size=0", "sample.group_size is 0: "),
        ("train.weight_decay=-0.1", "train.weight_decay must be >= 0.0, got -0.1"),
        ("algorithm.kl_coef=-1", "algorithm.kl_coef must be >= 0.0"),
        ("sample.noise_level=-0.5", "sample.noise_level must be >= 0.0"),
        ("train.adam_betas=[0.9, 1.0]", r"train.adam_betas[1] must be in [0, 1), got 1.0"),
        ("train={ema: true, ema_decay: 1.5}", "train.ema_decay must be in [0, 1), got 1.5"),
        ("model.lora_alpha=0", "model.lora_alpha must be > 0"),
        ("reward.advantage_clip=0", "reward.advantage_clip must be > 0"),
        ("sample.height=-16", "sample.height must be > 0"),
        ("reward.terms=[{name: colour, weight: 0}]", "every reward.terms weight is 0"),
        ("log.output_dir=", "log.output_dir is empty"),
        ("eval.max_prompts=0", "eval.max_prompts must be >= 1"),
    ],
)
def test_value_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(GenerationConfig, DEMO, [f"data.train_prompts={PROMPTS}", override])
    assert message in str(error.value)


def test_ema_decay_is_checked_only_with_ema():
    load_config(GenerationConfig, DEMO, ["train.ema=false", "train.ema_decay=1.5"])


def test_group_of_one_is_fine_with_the_per_prompt_tracker():
    config = load_config(
        GenerationConfig,
        DEMO,
        [
            "sample.group_size=1",
            "reward.per_prompt_tracker=true",
            "train={samples_per_update: 4, microbatch_size: 4}",
        ],
    )
    assert config.sample.group_size == 1
    with pytest.raises(ConfigError, match=r"tracker_min_count \(9\) exceeds reward.tracker_buffer \(8\)"):
        load_config(
            GenerationConfig,
            DEMO,
            ["reward.per_prompt_tracker=true", "reward.tracker_buffer=8", "reward.tracker_min_count=9"],
        )


# ----- data files -----------------------------------------------------------------------------------------------
def test_every_bad_jsonl_record_is_named_with_its_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        '{"prompt": "a red cat"}\n{"prompt": \n\n{"text": "no prompt"}\n{"prompt": "a dog", "n": 1}\n'
    )
    with pytest.raises(DataError) as error:
        load_prompts(path)
    message = str(error.value)
    assert f"{path}:2: not valid JSON (Expecting value at column 11)" in message
    assert f"{path}:4: each JSONL record needs a non-empty string 'prompt' key" in message
    assert "(2 bad records of 4); fix them, or set data.bad_records: skip" in message
    assert f"{path}:1" not in message and f"{path}:5" not in message


def test_skip_keeps_the_good_records_and_warns_once_per_bad_one(tmp_path, caplog):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a red cat"}\nnot json\n{"prompt": ""}\n{"prompt": "a dog", "n": 1}\n')
    with caplog.at_level("WARNING", logger="gen_rl.data"):
        prompts = load_prompts(path, bad_records="skip")
    assert prompts.prompts == ["a red cat", "a dog"] and prompts.metadata == [{}, {"n": 1}]
    assert [record.getMessage() for record in caplog.records] == [
        f"skipping {path}:2: not valid JSON (Expecting value at column 1)",
        f"skipping {path}:3: each JSONL record needs a non-empty string 'prompt' key",
    ]
    path.write_text("not json\n")
    with pytest.raises(DataError, match="every record of .* is bad, nothing is left to train on"):
        load_prompts(path, bad_records="skip")


def test_prompt_file_errors_show_the_resolved_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(
        DataError, match=f"prompt file {tmp_path / 'missing.txt'} \\(data.eval_prompts\\) does not"
    ):
        load_prompts("missing.txt", key="data.eval_prompts")
    with pytest.raises(
        DataError, match=f"prompt file {tmp_path / 'empty.txt'} \\(data.train_prompts\\) is empty"
    ):
        load_prompts("empty.txt")
    with pytest.raises(DataError, match=f"{tmp_path / 'sub'} .* is a folder, not a file"):
        load_prompts("sub")


def test_paths_in_a_yaml_resolve_against_the_working_directory(tmp_path, monkeypatch):
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "prompts.txt").write_text("a cat\n")
    (folder / "run.yaml").write_text(
        f"data:\n  train_prompts: prompts.txt\nlog:\n  output_dir: {tmp_path / 'run'}\n"
    )
    config = load_config(GenerationConfig, folder / "run.yaml", ["log.tracker=none"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=f"prompt file {tmp_path / 'prompts.txt'} "):
        inputs.check_generation_inputs(config)
    monkeypatch.chdir(folder)
    inputs.check_generation_inputs(config)  # the same file is found from its own folder


def test_real_recipes_point_at_prompt_files_that_exist(monkeypatch):
    monkeypatch.chdir(ROOT)
    recipes = [
        path for path in sorted((ROOT / "configs").glob("*/*.yaml")) if task_of(str(path), []) == "generation"
    ]
    assert len(recipes) >= 4
    for path in recipes:
        config = load_config(GenerationConfig, path)
        assert len(load_prompts(config.data.train_prompts)) >= 8, path
        assert len(load_prompts(config.data.eval_prompts, key="data.eval_prompts")) >= 4, path


def test_vlm_records_are_checked_whole_at_start_up(tmp_path, caplog):
    from gen_rl.vlm.data import read_checked_records

    (tmp_path / "here.png").write_bytes(b"")
    lines = [
        {"id": "a", "image": "here.png", "problem": "p", "solution": "s"},
        {"id": "b", "image": "gone.png", "problem": "p", "solution": "s"},
        {"image": "here.png", "problem": "p"},
        {"id": "d", "image": ["here.png", "also_gone.png"], "problem": "p", "solution": "s"},
    ]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + "{broken\n")
    with pytest.raises(DataError) as error:
        read_checked_records(path, tmp_path)
    message = str(error.value)
    assert f"{path}:2: {tmp_path / 'gone.png'} does not exist (record 'b')" in message
    assert f"{path}:3: missing ['solution']" in message
    assert f"{path}:4: {tmp_path / 'also_gone.png'} does not exist (record 'd')" in message
    assert (
        f"{path}:5: not valid JSON (Expecting property name enclosed in double quotes at column 2)" in message
    )
    assert "(4 bad records of 5)" in message
    with caplog.at_level("WARNING", logger="gen_rl.data"):
        records = read_checked_records(path, tmp_path, bad_records="skip")
    assert [record.key for record in records] == ["a"] and len(caplog.records) == 4


def test_vlm_image_root_must_be_a_folder(tmp_path):
    from gen_rl.vlm.config import VLMConfig

    config = load_config(
        VLMConfig,
        None,
        [
            "data.stages=[{synthetic: colour}]",
            "reward.terms=[{name: exact}]",
            f"data.image_root={tmp_path / 'nope'}",
            f"log.output_dir={tmp_path / 'run'}",
        ],
    )
    with pytest.raises(DataError, match=f"data.image_root {tmp_path / 'nope'} is not a folder"):
        inputs.check_vlm_inputs(config)


# ----- environment: run folder, tracker, weights ----------------------------------------------------------------
def test_output_dir_must_be_writable(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(
        ConfigError, match=f"log.output_dir {tmp_path / 'file' / 'run'} cannot be made: .* is a file"
    ):
        inputs.check_output_dir(str(tmp_path / "file" / "run"))
    with pytest.raises(ConfigError, match="log.output_dir /proc/gen_rl_run is not writable"):
        inputs.check_output_dir("/proc/gen_rl_run")  # /proc refuses new entries even for root
    assert inputs.check_output_dir(str(tmp_path / "new" / "run")) == tmp_path / "new" / "run"
    assert not (tmp_path / "new").exists()  # checked, not created
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]  # the write probe is removed


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_tracker_must_be_installed(monkeypatch):
    monkeypatch.setitem(inputs.TRACKER_MODULES, "wandb", ("gen_rl_no_such_module",))
    with pytest.raises(
        ConfigError, match="log.tracker is 'wandb' but gen_rl_no_such_module is not installed; pip"
    ):
        inputs.check_tracker("wandb")
    inputs.check_tracker("tensorboard")  # installed with the dev extras
    inputs.check_tracker("none")


def test_local_weights_must_exist_and_be_complete(tmp_path):
    with pytest.raises(
        hub.MissingWeightsError, match=f"model.pretrained: {tmp_path / 'nope'} does not exist"
    ):
        hub.check_weights(str(tmp_path / "nope"), "model.pretrained", "model_index.json")
    with pytest.raises(hub.MissingWeightsError, match=f"{tmp_path} has no model_index.json"):
        hub.check_weights(str(tmp_path), "model.pretrained", "model_index.json")
    (tmp_path / "model_index.json").write_text("{}")
    hub.check_weights(str(tmp_path), "model.pretrained", "model_index.json")
    assert issubclass(hub.MissingWeightsError, ConfigError) and issubclass(hub.MissingWeightsError, OSError)


def test_an_unreachable_hub_fails_at_once_and_turns_the_process_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setenv(
        "HF_ENDPOINT", "http://127.0.0.1:9"
    )  # the discard port: nothing listens, refused at once
    monkeypatch.setenv(hub._PROBE_MARK, "")
    hub.hub_reachable.cache_clear()
    try:
        start = time.perf_counter()
        unreachable = "not in the local hub cache and the hub cannot be reached"
        with pytest.raises(hub.MissingWeightsError, match=unreachable):
            hub.check_weights("no-such-owner/no-such-model", "model.pretrained", "model_index.json")
        assert time.perf_counter() - start < hub.HUB_PROBE_SECONDS + 0.5
        assert os.environ["HF_HUB_OFFLINE"] == "1"  # every later loader goes to the cache only
    finally:
        hub.hub_reachable.cache_clear()


def test_reward_weights_fail_fast_offline():
    from transformers import CLIPConfig

    from rewards.weights import MissingWeightsError, load_pretrained, resolve_file

    start = time.perf_counter()
    with pytest.raises(MissingWeightsError, match="HF_HUB_OFFLINE=1 is set") as error:
        resolve_file("no-such-owner/no-such-weights", "weights.pt", what="test head", published="nowhere")
    assert "\n" not in str(error.value) and isinstance(error.value, ConfigError)
    with pytest.raises(
        MissingWeightsError, match="could not load from the hub repo .* \\(HF_HUB_OFFLINE=1 is set\\)"
    ):
        load_pretrained(
            CLIPConfig.from_pretrained, "no-such-owner/no-such-clip", what="CLIP", published="nowhere"
        )
    assert time.perf_counter() - start < 5.0


def test_load_pretrained_asks_for_local_files_only_when_the_hub_cannot_be_used(monkeypatch):
    from rewards.weights import load_pretrained

    received = {}

    def loader(source, **kwargs):
        received.update(kwargs)
        return source

    load_pretrained(loader, "owner/model", what="x", published="y")
    assert received == {"local_files_only": True}  # HF_HUB_OFFLINE=1 in the tests
    received.clear()
    monkeypatch.setattr("rewards.weights.hub_unusable_reason", lambda: None)
    load_pretrained(loader, "owner/model", what="x", published="y")
    assert received == {}


# ----- image size -----------------------------------------------------------------------------------------------
def test_image_multiple_comes_from_the_model_config_files(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "transformer").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"patch_size": 4}))
    assert inputs.image_multiple("sd3", str(tmp_path)) == 8 * 4
    assert inputs.image_multiple("flux", str(tmp_path)) == 8 * 2  # FLUX packs 2x2 latents whatever patch_size
    assert inputs.image_multiple("flux", "no-such-owner/uncached") == 16  # the family's checkpoints
    assert inputs.image_multiple("my.module:Sampler", str(tmp_path)) is None
    with pytest.raises(ConfigError, match="sample.width is 520, but .* multiples of 32 .*; use 512 or 544"):
        inputs.check_image_size("sd3", str(tmp_path), 512, 520)
    with pytest.raises(ConfigError, match="sample.height is 8, but .*; use 32"):
        inputs.check_image_size("sd3", str(tmp_path), 8, None)
    inputs.check_image_size("sd3", str(tmp_path), 64, None)


def test_tiny_model_table_matches_the_tiny_pipelines():
    from gen_rl.policy import TINY_MODELS
    from pipelines.tiny import tiny_flux_pipeline, tiny_sd3_pipeline

    assert set(inputs.TINY_GENERATORS) == set(TINY_MODELS)
    flux, sd3 = tiny_flux_pipeline(seed=0), tiny_sd3_pipeline(seed=0)
    assert inputs.TINY_GENERATORS["tiny:flux"] == ("flux", flux.vae_scale_factor * 2)
    assert inputs.TINY_GENERATORS["tiny:sd3"] == (
        "sd3",
        sd3.vae_scale_factor * sd3.transformer.config.patch_size,
    )


def test_tiny_model_must_match_the_family(tmp_path):
    config = load_config(
        GenerationConfig, DEMO, ["model.family=sd3", f"log.output_dir={tmp_path}", "log.tracker=none"]
    )
    with pytest.raises(ConfigError, match="'tiny:flux-pixel' is a flux model but model.family is 'sd3'; set"):
        inputs.check_generation_inputs(config)


# ----- stage 2: registered names (torch imported, nothing loaded) ----------------------------------------------
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("reward.terms=[{name: colr}]", "reward.terms[0]: unknown reward 'colr'. Did you mean"),
        (
            "reward.terms=[{name: colour, kwargs: {bogus: 1}}]",
            "reward.terms[0]: reward 'colour' (ColourReward)",
        ),
        (
            "eval.gold=[{name: clip_scor}]",
            "eval.gold[0]: unknown reward 'clip_scor'. Did you mean 'clip_score'",
        ),
        ("eval.gold=[{name: 'os.path:join'}]", "eval.gold[0]: 'os.path:join' resolves to"),
        ("model.family=not_a_family", "model.family: unknown model family 'not_a_family'"),
    ],
)
def test_unknown_names_are_reported_before_any_model_loads(override, message):
    config = load_config(GenerationConfig, DEMO, [override])
    with pytest.raises(ConfigError) as error:
        inputs.check_registered_names(config)
    assert message in str(error.value)


# ----- the trainers read data with the same checks and honour data.bad_records ----------------------------------
def test_generation_trainer_skips_bad_prompt_records(tmp_path):
    from gen_rl.trainer import GenerationTrainer

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red ball"}\n{"text": "no prompt"}\n{"prompt": "a blue ball"}\n')
    overrides = [f"data.train_prompts={prompts}", "data.eval_prompts=", f"log.output_dir={tmp_path / 'run'}"]
    overrides += ["log.tracker=none", "log.progress=false", "log.monitors=false", "eval.gold=[]"]
    with pytest.raises(DataError, match=f"{prompts}:2: each JSONL record needs"):
        GenerationTrainer(load_config(GenerationConfig, DEMO, overrides))
    trainer = GenerationTrainer(load_config(GenerationConfig, DEMO, [*overrides, "data.bad_records=skip"]))
    assert trainer.train_set.prompts == ["a red ball", "a blue ball"]


def test_vlm_trainer_curriculum_skips_bad_records(tmp_path):
    from types import SimpleNamespace

    from gen_rl.vlm.config import VLMConfig
    from gen_rl.vlm.trainer import VLMTrainer

    (tmp_path / "a.png").write_bytes(b"")
    records = tmp_path / "records.jsonl"
    records.write_text(
        '{"image": "a.png", "problem": "p", "solution": "s"}\n{"image": "gone.png", "problem": "p", "solution": "s"}\n'
    )
    base = [
        f"data.stages=[{{files: [{records}]}}]",
        "reward.terms=[{name: exact}]",
        f"data.image_root={tmp_path}",
    ]
    config = load_config(VLMConfig, None, base)
    with pytest.raises(DataError, match="gone.png does not exist"):
        VLMTrainer._build_curriculum(SimpleNamespace(config=config))
    config = load_config(VLMConfig, None, [*base, "data.bad_records=skip"])
    curriculum = VLMTrainer._build_curriculum(SimpleNamespace(config=config))
    assert [record.images for record in curriculum.stages[0].records] == [[str(tmp_path / "a.png")]]


def test_check_flag_validates_everything_and_loads_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(["--config", str(DEMO), "--check", f"log.output_dir={run}"]) == 0
    assert "config, data files and weights checked, no problem found" in capsys.readouterr().out
    assert not run.exists()  # nothing was written: no trainer was built
    assert "unknown reward 'colr'" in cli_error(
        capsys, "--config", str(DEMO), "--check", "reward.terms=[{name: colr}]"
    )


def test_unknown_vlm_reward_names_are_reported_before_any_model_loads():
    from gen_rl.vlm.config import VLMConfig

    config = load_config(
        VLMConfig,
        None,
        ["data.stages=[{synthetic: colour}]", "reward.terms=[{name: exact}, {name: exactt}]"],
    )
    with pytest.raises(
        ConfigError, match=r"reward\.terms\[1\]: unknown verifiable reward 'exactt'. Did you mean"
    ):
        inputs.check_registered_names(config)
