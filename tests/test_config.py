"""Configs: every packaged YAML is valid; unknown keys and bad values are clear errors."""
import subprocess
import sys

import pytest

from noprop_fast.config import (CONFIG_DIR, ImageConfig, list_configs, load_config, resolve)
from noprop_fast.errors import ConfigError


def test_every_packaged_config_is_valid_and_the_paper_grid_is_complete():
    names = {name for name, _ in list_configs()}
    for dataset in ("mnist", "cifar10", "cifar100"):
        for method in ("noprop", "backprop"):
            for embedding in ("onehot", "learned", "prototype"):
                name = f"{dataset}-{method}-{embedding}"
                assert name in names
                cfg = load_config(name).validate()
                assert (cfg.dataset, cfg.method, cfg.embedding) == (dataset, method, embedding)
                # the paper's optimiser settings (docs/method.md section 2)
                assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.num_blocks) == (1e-3, 1e-3, 128, 10)
                assert cfg.epochs == (100 if dataset == "mnist" else 150)
    assert load_config("digits").validate().dataset == "digits"
    assert all(description for _, description in list_configs())


def test_the_continuous_time_grid_is_complete_with_the_papers_settings():
    """NoProp-CT and -FM, one file per dataset x embedding: the paper's appendix values for CT
    (FM: the same; its row could not be read), 1000 inference steps, the DT configs' T."""
    names = {name for name, _ in list_configs()}
    for method in ("noprop-ct", "noprop-fm"):
        for dataset, epochs in (("mnist", 100), ("cifar10", 500), ("cifar100", 1000)):
            for embedding in ("onehot", "learned", "prototype"):
                name = f"{dataset}-{method}-{embedding}"
                assert name in names
                cfg = load_config(name).validate()
                assert (cfg.dataset, cfg.method, cfg.embedding) == (dataset, method, embedding)
                assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.eta) == (1e-3, 1e-3, 128, 1.0)
                assert (cfg.epochs, cfg.inference_steps, cfg.num_blocks) == (epochs, 1000, 10)
                assert cfg.embed_dim == 20 or embedding != "learned"
                if method == "noprop-fm":
                    assert cfg.ode_solver == "euler"


def test_every_packaged_config_loads_and_validates():
    from noprop_fast.config import TASK_CONFIGS, read_yaml
    for name, _ in list_configs():
        path = CONFIG_DIR / f"{name}.yaml"
        cls = TASK_CONFIGS[read_yaml(path).get("task", "image")]
        assert load_config(name, cls).validate().task == cls().task, name


def test_precedence_defaults_then_file_then_command_line(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("epochs: 7\nlr: 0.01\n")
    cfg = resolve(str(path), {"lr": "0.5", "num_blocks": "3"})
    assert (cfg.epochs, cfg.lr, cfg.num_blocks, cfg.batch_size) == (7, 0.5, 3, ImageConfig().batch_size)
    assert resolve(None, {}).dataset == "digits"  # no --config: the fast default


@pytest.mark.parametrize("text, message", [
    ("epochz: 3\n", "unknown key 'epochz'"),
    ("epochs: ten\n", "epochs: 'ten' is not a valid int"),
    ("epochs: 2.5\n", "epochs: 2.5 is not a valid int"),
    ("lr: [1, 2]\n", "lr: [1, 2] is not a valid float"),
    ("method: sgd\n", "method: 'sgd' is not one of noprop, noprop-ct, noprop-fm, backprop"),
    ("epochs: 0\n", "epochs: 0 is below its minimum 1"),
    ("dropout: 1.0\n", "dropout: 1.0 must be below 1"),
    ("num_blocks: 40\n", "use snr_max >"),
    ("- a\n- b\n", "expected a mapping"),
    ("epochs: [\n", "cannot read YAML"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        resolve(str(path), {})
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_names_and_files():
    with pytest.raises(ConfigError, match="no config named 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/no/such/file.yaml")


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "noprop_fast.train", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--config", "nope"], "no config named 'nope'"),
    (["--epochs", "0"], "epochs: 0 is below its minimum"),
    (["--embedding", "random"], "embedding: 'random' is not one of"),
    (["--lr", "fast"], "lr: 'fast' is not a valid float"),
    (["--dataset", "mnist", "--data-dir", "does-not-exist"], "does-not-exist"),
    (["--resume", "no-such-run"], "no-such-run"),
    (["--device", "cuda"], "cuda"),
    (["--bogus-flag", "1"], "unrecognized arguments: --bogus-flag"),
    (["--task", "video"], "argument --task: invalid choice"),
])
def test_cli_user_errors_end_in_one_line_and_nonzero_exit(tmp_path, args, message):
    import torch
    if args == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = run_cli(*args, "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_list_configs_and_help(tmp_path):
    listing = run_cli("--list-configs", cwd=tmp_path)
    assert listing.returncode == 0
    assert len(listing.stdout.splitlines()) == len(list(CONFIG_DIR.glob("*.yaml")))
    marked = [line.split()[:3] for line in listing.stdout.splitlines() if "[default" in line]
    assert marked == [["digits", "[default,", "--task"], ["stdlib", "[default,", "--task"]]
    assert "digits [default, --task image] A first run:" in " ".join(listing.stdout.split())
    helptext = run_cli("--help", cwd=tmp_path)
    assert helptext.returncode == 0
    for field in ("--num-blocks", "--block-schedule", "--inference", "--embedding", "--data-dir"):
        assert field in helptext.stdout


def help_defaults(helptext: str) -> dict[str, str]:
    """--field-name -> the text inside its help line's last [default ...], whitespace joined."""
    import re
    text = " ".join(helptext.split())
    found = {}
    for match in re.finditer(r"(--[a-z][a-z-]*) [^\[]*?(?:\[[^\]]*\][^\[]*?)*?\[default ([^\]]*)\]",
                             text):
        found.setdefault(match[1], match[2].replace("- ", "-"))  # argparse wraps after a hyphen
    return found


@pytest.mark.parametrize("task, config, epochs_key", [("image", "digits", "epochs"),
                                                       ("lm", "stdlib", "max_steps"),
                                                       ("image", "mnist-noprop-onehot", "epochs")])
def test_help_shows_what_a_run_without_options_uses(tmp_path, task, config, epochs_key):
    """Every field's [default ...] in --help is the value of the config a run with no field
    options resolves (the task's default config over the dataclass), and says when it comes from
    the config file; with --config NAME, that config's values."""
    import yaml

    from noprop_fast import train
    from noprop_fast.config import TASK_CONFIGS
    named = [] if config == TASK_CONFIGS[task].DEFAULT else ["--config", config]
    helptext = run_cli("--task", task, *named, "--help", cwd=tmp_path)
    assert helptext.returncode == 0
    shown = help_defaults(helptext.stdout)
    resolved = train.config_from_args(train.parse_args(["--task", task, *named]))
    in_file = yaml.safe_load((CONFIG_DIR / f"{config}.yaml").read_text())
    fields = [f for f in resolved.to_dict() if f != "task"]
    for name in fields:
        value = getattr(resolved, name)
        text = ("on" if value else "off") if isinstance(value, bool) else str(value)
        where = f", {config} config" if name in in_file else ""
        assert shown["--" + name.replace("_", "-")] == text + where, name
    assert shown["--" + epochs_key.replace("_", "-")] == f"{getattr(resolved, epochs_key)}, {config} config"
