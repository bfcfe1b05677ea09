"""The project's model source, carried into a Hugging Face export so that remote code runs the very same model.

transformers' remote-code loader (transformers/dynamic_module_utils.py) copies the modeling file named in
config.json's `auto_map` into its module cache, and with it every file that file imports as `from .name import`,
recursively, from the same folder: sibling files only, no sub-packages. So each module of the project that the
model needs is written as one flat file named after its dotted path (synergy_dist.model.moe.layer ->
synergy_dist_model_moe_layer.py), and its imports of the project become relative imports of those files;
nothing else in the text changes (tests/test_hf_export.py checks it against the source).
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

PROJECT_PACKAGES = ("synergy_dist", "data_pipeline")
# the transformers-side modules keep the names transformers' conventions give them
ENTRY_FILES = {
    "synergy_dist.hf.configuration": "configuration_synergy",
    "synergy_dist.hf.modeling": "modeling_synergy",
    "synergy_dist.hf.tokenizer": "tokenization_synergy",
}
_PROJECT_IMPORT = re.compile(r"^(\s*)from ((?:synergy_dist|data_pipeline)(?:\.\w+)*) import ", flags=re.M)


def flat_name(module: str) -> str:
    """The exported file (without .py) of a project module."""
    return ENTRY_FILES.get(module, module.replace(".", "_"))


def module_file(module: str) -> Path:
    """The source file of a project module (a module file, not a package)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or Path(spec.origin).name == "__init__.py":
        raise ValueError(f"{module} is not a module file of the project: import names from modules "
                         "(from synergy_dist.model.synergy import SynergyLM), not from packages")
    return Path(spec.origin)


def project_imports(text: str, where: str) -> set[str]:
    """The project modules a source text imports (at module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(text, filename=where)):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] in PROJECT_PACKAGES for a in node.names):
            raise ValueError(f"{where}: `import {node.names[0].name}` cannot be carried into an export; "
                             "write `from package.module import name`")
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in PROJECT_PACKAGES:
            found.add(node.module)
    return found


def model_sources() -> dict[str, str]:
    """{module: source text} of the transformers-side modules and every project module they import."""
    sources: dict[str, str] = {}
    pending = list(ENTRY_FILES)
    while pending:
        module = pending.pop()
        if module not in sources:
            sources[module] = module_file(module).read_text()
            pending.extend(project_imports(sources[module], module))
    return sources


def relative_imports(text: str) -> str:
    """The source text with each `from <project module> import` made relative to its flat file."""
    return _PROJECT_IMPORT.sub(lambda m: f"{m[1]}from .{flat_name(m[2])} import ", text)


def write_model_source(output: Path) -> list[str]:
    """Write the flat modules into `output`; returns the file names."""
    names = []
    for module, text in sorted(model_sources().items()):
        exported = relative_imports(text)
        left = project_imports(exported, module)
        if left:  # an import form the rewrite does not know would still need the project installed
            raise ValueError(f"{module}: imports of {sorted(left)} were not made relative")
        name = flat_name(module) + ".py"
        (output / name).write_text(exported)
        names.append(name)
    return names
