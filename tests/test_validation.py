"""Bad settings stop ``python -m mnist_cnn.train`` before any work: one message, exit 2."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import cli, compose_train
from omegaconf import OmegaConf

from mnist_cnn import ROOT
from mnist_cnn.train import train
from mnist_cnn.validate import (
    RULES,
    ConfigError,
    check,
    check_trainer,
    explain,
    out_of_memory,
)

# override -> words the message must hold (the key, the value, what is allowed)
BAD = {
    "data.batch_size=0": ["data.batch_size=0", "an integer >= 1"],
    "data.batch_size=abc": ["data.batch_size=abc", "an integer >= 1"],
    "model.optimizer.lr=0": ["model.optimizer.lr=0", "a number > 0"],
    "model.optimizer.lr=-0.1": ["model.optimizer.lr=-0.1", "a number > 0"],
    "model.net.dropout=1.0": ["model.net.dropout=1.0", "[0, 1)"],
    "model.net.dropout=-0.5": ["model.net.dropout=-0.5", "[0, 1)"],
    "trainer.accelerator=gpux": ["trainer.accelerator=gpux", "Available names are: auto"],
    "trainer.precision=bf16mixed": ["trainer.precision=bf16mixed", "'bf16-mixed', '32-true'"],
    "trainer.devices=0": ["trainer.devices=0", "not a valid input"],
    "trainer.devices=-3": ["trainer.devices=-3", "should be an int > 0"],
    "trainer.max_epochs=0": ["trainer.max_epochs=0", "an integer >= 1"],
    "trainer.max_epoch=3": ["trainer.max_epoch", "did you mean trainer.max_epochs?"],
    "data.batchsize=32": ["data.batchsize", "did you mean data.batch_size?"],
    "~callbacks.export": ["callbacks.export", "does not exist"],
    "trainer=gpux": ["trainer=gpux", "cpu, default, gpu"],
    "model.net.kernel_size=0": ["model.net.kernel_size=0", "an integer >= 1"],
    "model.net.channels=[0,1]": ["model.net.channels=[0, 1]", "two integers >= 1"],
    "model.scheduler=bogus": ["model.scheduler=bogus", "null or a config with _target_"],
}
OTHER = {  # refused by Hydra as it composes: named in one line by validate.explain
    "trainer.max_epochs=3,4": ["trainer.max_epochs=3,4", "--multirun"],
    "trainer.stratgy=foo": ["Unknown config key trainer.stratgy", "+trainer.stratgy=foo"],
    "model/net=resnet9000": ["model/net=resnet9000", "lenet5, seed_cnn"],
}


def refusal(override: str) -> str:
    """What the command line says of ``override``: composing it as Hydra does, then the checks."""
    try:
        cfg = compose_train("paths.output_dir=.", override)
        check(cfg)
        check_trainer(cfg.trainer)  # Lightning's own check, in Hydra's callback too
    except ConfigError as e:
        return str(e)
    except Exception as e:
        assert (message := explain(e)) is not None, repr(e)
        return message
    raise AssertionError(f"{override} was accepted")


@pytest.mark.parametrize("bad", BAD | OTHER)
def test_each_bad_override_is_refused_with_key_value_and_what_is_allowed(bad):
    message = refusal(bad)
    for words in (BAD | OTHER)[bad]:
        assert words in message, message
    assert "did you mean" in message or "did you mean" not in str((BAD | OTHER)[bad])
    assert "_target_?" not in message  # never suggested for a misspelt key


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "ckpt_path=x.ckpt", "data.eval_bach_size=10", "did you mean data.eval_batch_size"],
        ["predict", "ckpt_path=x.ckpt", "input=[a.png]", "did you mean inputs"],
        ["export", "ckpt_path=x.ckpt", "formt=pt", "did you mean format"],
        ["tune", "tuen.n_trials=2", "did you mean tune.n_trials"],
    ],
    ids=lambda c: c[0],
)
@pytest.mark.slow
def test_every_command_names_a_misspelt_key_in_one_line(command, tmp_path):
    *args, words = command
    proc = cli(*args, cwd=tmp_path, code=2, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert words in proc.stderr and f"python -m mnist_cnn.{args[0]} --cfg job" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no run dir, no outputs/


@pytest.mark.slow
def test_bad_overrides_stop_the_cli_with_one_message_exit_2_and_no_run(tmp_path):
    # real processes, started together: every value rule at once, a misspelt key, an unknown
    # group option, a bad value inside a sweep, a resume with nothing to resume
    values = [b for b in BAD if "did you mean" not in BAD[b][1]]
    values = [b for b in values if not b.startswith(("~", "trainer="))]  # one value per key
    lightning = [b for b in values if b.startswith(("trainer.accelerator", "trainer.precision"))]
    values = [b for b in values if b not in lightning and not b.startswith("trainer.devices")]
    values.remove("data.batch_size=abc")  # one value per key
    values.remove("model.optimizer.lr=-0.1")
    values.remove("model.net.dropout=-0.5")
    runs = {
        "values": values + ["data.eval_batch_size=abc"],
        "key": ["trainer.max_epoch=3"],
        **{b.split("=")[0]: [b] for b in lightning},  # Lightning's check, one flag a run
        "group": ["trainer=gpux"],
        "sweep": ["-m", "model.optimizer.lr=0.001,-1"],
        "resume newest": ["resume=true"],  # nothing to resume yet
        "resume dir": [f"resume={tmp_path}/nowhere"],
        "log dir": [f"paths.log_dir={ROOT}/README.md/out"],
        "syntax": ["trainer.max_epochs=[1,"],
        "unicode": ["seed=é"],
        "long name": [f"hydra.run.dir={tmp_path}/{'a' * 300}"],
    }
    flags = {name: [a for a in args if a == "-m"] for name, args in runs.items()}  # Hydra's first
    with ThreadPoolExecutor(len(runs)) as pool:  # all at once
        procs = {
            name: pool.submit(
                cli,
                "train",
                *flags[name],
                f"paths.log_dir={tmp_path}",
                *[a for a in args if a != "-m"],
                code=None,
                timeout=300,
            )
            for name, args in runs.items()
        }
    for name, future in procs.items():
        proc = future.result()
        out, err = proc.stdout, proc.stderr
        assert proc.returncode == 2, (name, out, err)
        assert "Traceback" not in out + err, name
        (line,) = [line for line in err.splitlines() if line.strip()]  # one paragraph
        expected = [w for b in runs[name] for w in BAD.get(b, [])]
        expected += {
            "values": ["data.eval_batch_size=abc"],
            "sweep": ["lr=-1", "a number > 0"],
            "resume newest": [f"found no run with checkpoints/last.ckpt in {tmp_path}/runs"],
            "resume dir": [f"{tmp_path}/nowhere/checkpoints/last.ckpt does not exist"],
            "log dir": ["README.md is a file, not a folder", "paths.log_dir="],
            "syntax": ["Cannot parse the override", "key='a value'"],
            "unicode": ["Cannot parse the override 'seed=é'", "key='a value'"],
            "long name": ["Cannot make the run dir", "File name too long", "paths.log_dir="],
        }.get(name, [])
        for words in expected:
            assert words in line, (name, words, line)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "multiruns").exists()


def test_the_defaults_and_every_option_pass_and_every_rule_names_a_real_key():
    cfg = compose_train("paths.output_dir=.")
    check(cfg)
    tune = compose_train("paths.output_dir=.", config_name="tune")  # train + tune.* keys
    check(tune)
    for key in RULES:
        assert OmegaConf.select(tune, key, default="absent") != "absent", key
    for option in ("experiment=seed", "trainer=cpu", "debug=fast", "callbacks=none"):
        check(compose_train(option, "paths.output_dir=."))


@pytest.mark.parametrize("bad", ["data.batch_size=0", "trainer.max_epochs=-1"])
def test_train_checks_too_before_any_work(tmp_path, bad):
    cfg = compose_train(f"paths.output_dir={tmp_path}", bad)
    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        train(cfg)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_an_out_of_memory_in_any_command_names_the_batch_size():
    try:  # the CPU allocator's own error (a RuntimeError, not torch.OutOfMemoryError)
        torch.empty(2**60, dtype=torch.uint8)
    except RuntimeError as e:
        cpu = e
    assert out_of_memory(cpu) and out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert explain(cpu).startswith("Out of memory: lower data.batch_size or data.eval_batch_size")


RESNET = "{_target_:torchvision.models.resnet18,num_classes:10}"


def test_replacing_a_whole_node_names_the_form_that_works(make_cfg):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as error:
        compose_train(f"model.net={RESNET}")
    said = explain(error.value)
    assert f"~model.net '+model.net={RESNET}'" in said and "model/net=<name>" in said, said
    cfg = compose_train("~model.net", f"+model.net={RESNET}")  # the form it names works
    assert OmegaConf.to_container(cfg.model.net) == {
        "_target_": "torchvision.models.resnet18",
        "num_classes": 10,
    }
    # +model.net={...} merges into seed_cnn's keys: the refused key and both ways out are named
    with pytest.raises(ConfigError, match=r"~model\.net\.channels.*~model\.net '\+model\.net="):
        train(make_cfg(f"+model.net={RESNET}"))


@pytest.mark.parametrize(
    "override, words",
    [
        ("+hparams_search=mnist_optuna", "python -m mnist_cnn.tune"),
        ("+extras.print_config=false", "--cfg job"),
    ],
)
def test_lightning_hydra_template_keys_name_this_templates_way(override, words):
    with pytest.raises(ConfigError, match=f"lightning-hydra-template's key: .*{words}"):
        check(compose_train(override))


def test_an_unknown_key_of_lightning_hydra_template_is_not_misread_as_a_typo():
    from hydra.errors import ConfigCompositionException

    for override in ("extras.print_config=false", "hparams_search=mnist_optuna"):
        with pytest.raises(ConfigCompositionException) as error:
            compose_train(override)
        said = explain(error.value)
        assert "lightning-hydra-template's key" in said and "did you mean" not in said, said
