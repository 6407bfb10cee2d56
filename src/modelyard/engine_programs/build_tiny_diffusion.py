"""Builds a tiny Stable-Diffusion-style pipeline with random weights, for tests and the demo.

It needs no download: every part (UNet, VAE, CLIP text encoder, tokenizer, scheduler) is made from
a small config, with weights drawn from a fixed seed, so every build is the same. The images it
makes are coloured noise, but the pipeline has the real shape of Stable Diffusion 1.x (the same
classes, file layout and scheduler), so the server code that serves it serves SD 1.5 unchanged.

Run it with the engine venv's Python (it needs torch, diffusers and transformers and imports
nothing from modelyard):

    ~/.cache/modelyard/engine-venv/bin/python build_tiny_diffusion.py OUT_DIR [--force]

The folder appears atomically: the build goes to a temporary sibling folder that is renamed into
place, then a `.modelyard-complete` marker is written. A folder with the marker is left alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

COMPLETE_MARKER = ".modelyard-complete"
"""Written last; a folder without it is an interrupted build and is rebuilt."""

BUILD_SEED = 20261123
"""Seed of the random weights: the same build every time."""

SIDE = 64
"""Native image side in pixels (UNet sample size 8 times the VAE's scale factor 8)."""


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds a finished build."""
    return (folder / COMPLETE_MARKER).is_file()


def _byte_level_alphabet() -> list[str]:
    """The 256 characters that byte-level BPE uses for the bytes 0-255 (GPT-2's table)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def _tiny_tokenizer():  # -> CLIPTokenizer
    """A CLIP tokenizer whose vocabulary is single bytes only (no merges), made locally.

    Real CLIP's first 512 ids are exactly these byte tokens, so prompts tokenize the same way,
    just into more (shorter) tokens.
    """
    from transformers import CLIPTokenizer

    alphabet = _byte_level_alphabet()
    tokens = alphabet + [char + "</w>" for char in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _tiny_components(vocab_size: int) -> dict[str, object]:
    """UNet, VAE and text encoder with small random weights (drawn from BUILD_SEED)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(BUILD_SEED)
    unet = UNet2DConditionModel(
        sample_size=SIDE // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        # Cross-attention only at the coarser level: at full latent size it costs the most time.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=4,
    )
    # Four blocks give Stable Diffusion's scale factor of 8 between pixels and latents.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=4,
        sample_size=SIDE,
        mid_block_add_attention=False,  # self-attention over every latent pixel is slow on CPU
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        )
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


def build_pipeline():  # -> StableDiffusionPipeline
    """The tiny pipeline in memory, with Stable Diffusion 1.x's scheduler settings."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tokenizer = _tiny_tokenizer()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        **_tiny_components(len(tokenizer)),
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build(folder: Path, force: bool = False) -> bool:
    """Write the pipeline to `folder` atomically; False when a finished build was already there."""
    folder = folder.absolute()
    if is_complete(folder) and not force:
        return False
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is not secret
        build_pipeline().save_pretrained(staging, safe_serialization=True)
        (staging / COMPLETE_MARKER).write_text(f"seed {BUILD_SEED}\n")
        if is_complete(folder) and not force:
            return False  # a concurrent build finished first; keep its (identical) folder
        _replace(folder, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _replace(folder: Path, staging: Path) -> None:
    """Move `staging` to `folder`, first moving aside whatever unfinished build was there."""
    if folder.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
        os.replace(folder, trash / folder.name)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(staging, folder)


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main(argv: list[str] | None = None) -> int:
    """Command line: build into OUT_DIR unless a finished build is there."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to create (its parent may not exist)")
    parser.add_argument("--force", action="store_true", help="rebuild even if complete")
    options = parser.parse_args(argv)
    started = time.monotonic()
    built = build(options.out_dir, force=options.force)
    verb = "built" if built else "already complete:"
    size_mib = _folder_bytes(options.out_dir) / 2**20
    elapsed = time.monotonic() - started
    print(f"{verb} {options.out_dir} ({size_mib:.1f} MiB, {elapsed:.1f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
