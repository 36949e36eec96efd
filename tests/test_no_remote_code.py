"""Loading runs no code from files: every transformers Auto* load in the package passes trust_remote_code=False."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def auto_loads(tree: ast.AST):
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained"
                and isinstance(node.func.value, ast.Name) and node.func.value.id.startswith("Auto")):
            yield node


def test_every_transformers_auto_load_refuses_remote_code():
    checked, missing = 0, []
    for path in sorted([*ROOT.glob("rlmt_jax/**/*.py"), *ROOT.glob("models/**/*.py"), *ROOT.glob("benchmarks/*.py")]):
        for call in auto_loads(ast.parse(path.read_text())):
            checked += 1
            flag = [k for k in call.keywords if k.arg == "trust_remote_code"]
            if not flag or not (isinstance(flag[0].value, ast.Constant) and flag[0].value.value is False):
                missing.append(f"{path.relative_to(ROOT)}:{call.lineno}")
    assert checked >= 5  # the trainer, rewards, export, generate, score, toy tokenizer
    assert missing == []
