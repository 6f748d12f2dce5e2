"""`import scgpt_hf` and `scgpt-hf --help` load no heavy module, and everything they defer still works: every
public name, the Auto classes in whichever order things are imported, and the remote code written on saving.

Each case runs in a fresh interpreter, since what matters is what an import leaves in `sys.modules`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import scgpt_hf

# Modules that take seconds to import, and that `import scgpt_hf` and `scgpt-hf --help` must leave unloaded.
HEAVY = ("torch", "transformers", "anndata", "scipy", "pandas", "onnx", "onnxruntime", "h5py")


def run_python(code: str, *args: str) -> str:
    """Run `code` in a fresh interpreter and return its stdout; a failure shows its stderr."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_import_loads_no_heavy_module() -> None:
    loaded = run_python(f"""
        import sys
        import scgpt_hf
        print(" ".join(m for m in {HEAVY!r} if m in sys.modules))
    """)
    assert loaded.split() == []


def test_cli_help_loads_no_heavy_module() -> None:
    """`scgpt-hf --help` and `scgpt-hf COMMAND [SUBCOMMAND] --help` for every command the parser has."""
    loaded = run_python(f"""
        import argparse, contextlib, io, sys
        from scgpt_hf.cli import build_parser, main

        def commands(parser, prefix=()):
            yield prefix
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    for name, sub in action.choices.items():
                        yield from commands(sub, prefix + (name,))

        for command in [*commands(build_parser())]:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
                main([*command, "--help"])
            heavy = [m for m in {HEAVY!r} if m in sys.modules]
            if heavy:
                print(" ".join(command) or "(top level)", "loads", *heavy)
                break
    """)
    assert loaded == ""


def test_public_names() -> None:
    """Every name of `__all__` resolves (lazily) to the object of its home module, and `dir` lists it."""
    assert scgpt_hf.__version__ == "0.1.0"
    for name in scgpt_hf.__all__:
        value = getattr(scgpt_hf, name)
        assert value.__name__ == name and value.__module__.startswith("scgpt_hf.")
        assert getattr(sys.modules[value.__module__], name) is value
        assert name in dir(scgpt_hf)
    namespace: dict = {}
    exec("from scgpt_hf import *", namespace)
    assert set(scgpt_hf.__all__) <= set(namespace)
    with pytest.raises(AttributeError, match="scgpt_hf.*no_such_name"):
        scgpt_hf.no_such_name  # noqa: B018


def test_cli_constants_match_their_modules() -> None:
    """The command line lists the converter's tasks without importing the converter."""
    from scgpt_hf import constants, convert, inference

    assert set(constants.CONVERT_TASKS) == set(convert.TASKS)
    assert constants.INFERENCE_PRECISIONS == inference.PRECISIONS


SAVE = """
import json, os, sys
from scgpt_hf import ScGPTConfig
vocab = {f"g{i}": i for i in range(10)} | {"<pad>": 10, "<cls>": 11, "<eoc>": 12}
config = ScGPTConfig(vocab_size=13, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                     pad_token_id=10, cls_token_id=11, eoc_token_id=12, max_seq_len=8)
config.save_pretrained(os.path.join(sys.argv[1], "config_only"))  # before any model module is imported

from scgpt_hf import ScGPTForPreTraining, ScGPTTokenizer
with open(os.path.join(sys.argv[1], "vocab.json"), "w") as f:
    json.dump(vocab, f)
model_dir = os.path.join(sys.argv[1], "model")
ScGPTForPreTraining(config).save_pretrained(model_dir)
ScGPTTokenizer(os.path.join(sys.argv[1], "vocab.json")).save_pretrained(model_dir)
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A model and tokenizer folder written by a fresh interpreter that imported only from scgpt_hf."""
    folder = tmp_path_factory.mktemp("imports")
    run_python(SAVE, str(folder))
    return folder


def test_saves_carry_remote_code(saved: Path) -> None:
    """The remote-code registration happens before the first save, even one of a config alone."""
    assert (saved / "config_only" / "configuration_scgpt.py").is_file()
    config_map = json.loads((saved / "config_only" / "config.json").read_text())["auto_map"]
    assert config_map["AutoConfig"] == "configuration_scgpt.ScGPTConfig"
    model_dir = saved / "model"
    for code in ("configuration_scgpt.py", "modeling_scgpt.py", "tokenization_scgpt.py"):
        assert (model_dir / code).is_file(), code
    assert json.loads((model_dir / "config.json").read_text())["auto_map"]["AutoModelForPreTraining"] == (
        "modeling_scgpt.ScGPTForPreTraining")
    assert json.loads((model_dir / "tokenizer_config.json").read_text())["auto_map"]["AutoTokenizer"][0] == (
        "tokenization_scgpt.ScGPTTokenizer")


AUTO = """
import sys
{first}
from transformers import (AutoConfig, AutoModel, AutoModelForPreTraining, AutoModelForSequenceClassification,
                          AutoTokenizer)
import scgpt_hf
config = AutoConfig.from_pretrained(sys.argv[1])
found = [config, AutoTokenizer.from_pretrained(sys.argv[1]), AutoModelForPreTraining.from_pretrained(sys.argv[1])]
found += [auto.from_config(config) for auto in (AutoModel, AutoModelForSequenceClassification)]
print(" ".join(type(x).__name__ for x in found))
"""


@pytest.mark.parametrize("first", [
    "import scgpt_hf",  # registered when transformers' Auto classes load, after that import
    "from transformers import AutoConfig",  # registered by `import scgpt_hf`, at once
    "import scgpt_hf; import transformers.modeling_layers",  # which loads the Auto classes half-way through
])
def test_auto_classes(saved: Path, first: str) -> None:
    found = run_python(AUTO.format(first=first), str(saved / "model")).split()
    assert found == ["ScGPTConfig", "ScGPTTokenizer", "ScGPTForPreTraining", "ScGPTModel",
                     "ScGPTForCellClassification"]
