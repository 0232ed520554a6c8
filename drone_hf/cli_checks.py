"""Checks of the `drone-hf` command line, each failing with a message that names the user's flag: argparse value types
for the numeric flags, the `--model` and `--output` paths (an output never overlaps the model it is made from, and a
folder drone-hf did not write is replaced only with `--overwrite`), the model's own limits (`--max-length`, `--rank`)
and `--push-to-hub`, all before any long work; and [`output_folder`], which writes the whole output (weights, config,
card, tokenizer, `drone_results.json`) aside and moves it into place at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


RESULTS_NAME = "drone_results.json"
# Files a tokenizer's `save_pretrained` may write; an output's own are replaced by the next output.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "spm.model",
    "tokenizer.model",
    "chat_template.jinja",
)
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


# --------------------------------------------------------------------------------------------- argparse types


def count(minimum: int = 1) -> Callable[[str], int]:
    """An argparse `type`: an integer `>= minimum` (argparse then names the flag in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def number(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False, hint: str = ""):
    """An argparse `type`: a finite number in the interval from `low` to `high` (open ends where asked)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or math.isinf(high) else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}{hint}, got {text}")
        return value

    return parse


# ------------------------------------------------------------------------------------------------------ paths


def looks_like_hub_id(value: str) -> bool:
    """`"user/model"` or `"model"`: what transformers would try on the Hub when no such local folder exists."""
    return bool(_HUB_ID_RE.match(value)) and not value.startswith((".", "~"))


def check_model_path(value: str, flag: str = "--model", markers: tuple[str, ...] = ("config.json",)) -> None:
    """Refuses a `--model` that is a file, a folder without `markers` (any of them), or a missing path that is not a
    Hub id. A missing Hub-like id is left to loading, whose failure [`model_load_error`] explains."""
    path = Path(value).expanduser()
    if path.is_file():
        raise ValueError(f"`{flag}` {value!r} is a file; pass the folder that holds the model's {markers[0]}.")
    if path.is_dir():
        if not any((path / marker).is_file() for marker in markers):
            raise FileNotFoundError(
                f"`{flag}` folder {value!r} has no {' or '.join(markers)}: is it a model saved with `save_pretrained`?"
            )
        return
    if not looks_like_hub_id(value):
        raise FileNotFoundError(f"`{flag}` folder {value!r} does not exist.")


def model_load_error(value: str, error: Exception, flag: str = "--model") -> Exception:
    """A clearer error for a `--model` that could not be loaded: for a missing local path taken as a Hub id, says
    that it is neither (and whether the Hub was offline); other errors are returned as they are."""
    if Path(value).expanduser().exists():
        return error
    from huggingface_hub import constants

    reason = (
        "the Hub is not reachable offline (HF_HUB_OFFLINE is set) and it is not in the local cache"
        if constants.HF_HUB_OFFLINE
        else f"the Hub answered: {error}"
    )
    return FileNotFoundError(
        f"`{flag}` {value!r} is not a local folder (no such file or folder), and as a Hub model id it could not be "
        f"loaded: {reason}."
    )


def check_output(output: str, model: str, *, overwrite: bool, flag: str = "--output") -> None:
    """Refuses an `--output` that would destroy or mix with something: the `--model` folder itself, a folder inside
    it or containing it, a file, a place that cannot be written, and (without `overwrite`) a non-empty folder that is
    not an earlier drone-hf output. Creates nothing."""
    target = Path(output).expanduser().resolve()
    source = Path(model).expanduser()
    if source.exists():
        source = source.resolve()
        if target == source:
            raise ValueError(
                f"`{flag}` {output!r} is the `--model` folder: writing there would replace the model being "
                "compressed. Choose another folder."
            )
        if source in target.parents:
            raise ValueError(
                f"`{flag}` {output!r} is inside the `--model` folder {model!r}: drone-hf never writes into the "
                "model it reads. Choose a folder outside it."
            )
        if target in source.parents:
            raise ValueError(
                f"`--model` {model!r} is inside the `{flag}` folder {output!r}: an output folder is replaced as a "
                f"whole, so it must not hold the model. Choose an `{flag}` that does not contain the model."
            )
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"`{flag}` {output!r} is a file, not a folder. Choose a folder.")
    existing = next(path for path in (target, *target.parents) if path.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"`{flag}` {output!r} cannot be created: {str(existing)!r} is a file.")
    try:  # the only reliable test (root, read-only mounts, ACLs): create something there and remove it
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".drone_hf-probe-"))
    except OSError as error:
        raise PermissionError(
            f"`{flag}` {output!r} cannot be written: creating a folder in {str(existing)!r} failed ({error})."
        ) from None
    if target.is_dir() and not overwrite:
        entries = [name for name in os.listdir(target) if not name.startswith(".drone_hf-")]
        if entries and not (target / RESULTS_NAME).is_file():
            raise FileExistsError(
                f"`{flag}` {output!r} is a non-empty folder that drone-hf did not write (it has no {RESULTS_NAME}). "
                "Pass `--overwrite` to write the compressed model into it (its model, tokenizer, card and results "
                "files are replaced; other files are kept), or choose a new or empty folder."
            )


def check_push(repo: str | None) -> None:
    """Refuses `--push-to-hub` before any work when the upload cannot happen (offline, or no token)."""
    if not repo:
        return
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise ValueError(
            f"`--push-to-hub {repo}` needs the Hub, but offline mode is on (HF_HUB_OFFLINE): unset it, or drop "
            "`--push-to-hub` and upload the output folder later."
        )
    if get_token() is None:
        raise ValueError(f"`--push-to-hub {repo}` needs a Hub token: run `hf auth login` or set HF_TOKEN.")


# ------------------------------------------------------------------------------------------ the model's limits


def position_limit(model) -> int | None:
    """How many tokens the model's absolute position table takes (RoBERTa-style tables reserve `padding_idx + 1`
    rows), or `None` for relative or rotary positions."""
    from torch import nn

    table = getattr(getattr(model.base_model, "embeddings", None), "position_embeddings", None)
    if not isinstance(table, nn.Embedding):
        return None
    return table.num_embeddings - (table.padding_idx + 1 if table.padding_idx is not None else 0)


def resolve_max_length(model, max_length: int | None, default: int = 128) -> int:
    """`--max-length`, checked against the model's positions; when not given, `default` or the model's limit."""
    limit = position_limit(model)
    if max_length is None:
        return default if limit is None else min(default, limit)
    if limit is not None and max_length > limit:
        raise ValueError(
            f"`--max-length {max_length}` is more than `--model` can take: its max_position_embeddings is "
            f"{model.config.max_position_embeddings} ({limit} usable positions). Pass `--max-length {limit}` or less."
        )
    return max_length


def check_tokenizer(model_path: str, tokenizer, model) -> None:
    """Refuses a `--model` folder without tokenizer files: transformers would quietly build one that maps every word
    to [UNK]."""
    folder = Path(model_path).expanduser()
    vocab = getattr(model.config, "vocab_size", None)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"`--model` folder {model_path!r} has no tokenizer files ({', '.join(TOKENIZER_FILES[:5])}, ...): save "
            "the tokenizer the model was fine-tuned with beside it (`tokenizer.save_pretrained(folder)`)."
        )
    if vocab and len(tokenizer) < vocab // 2:
        raise ValueError(
            f"The tokenizer of `--model` {model_path!r} has {len(tokenizer)} tokens but the model's vocabulary has "
            f"{vocab}: it is not the tokenizer the model was trained with."
        )


def check_rank(model, rank: int | None) -> None:
    """Refuses a `--rank` that is not below the width of every encoder linear."""
    if rank is None:
        return
    from .targets import encoder_linear_roles

    modules = dict(model.named_modules())
    widths = {name: min(modules[name].in_features, modules[name].out_features) for name in encoder_linear_roles(model)}
    if widths:
        name = min(widths, key=widths.get)
        if rank >= widths[name]:
            raise ValueError(
                f"`--rank {rank}` must be below the width of every encoder linear; the narrowest, {name}, has "
                f"min(in, out) = {widths[name]}. Pass `--rank {widths[name] - 1}` or less."
            )


# --------------------------------------------------------------------------------------------- the output


def _owned_output_files(folder: Path) -> list[str]:
    """What an earlier output in `folder` holds that the new output replaces or removes: the checkpoint's own files
    (weights, config, modelling code; a sentence-transformers model's modules), the tokenizer's, the card, the
    results, and every file the earlier output listed in its results."""
    from .hub import _owned_files
    from .sentence_embeddings import _owned_sentence_transformer_files

    names = {*_owned_files(folder), *_owned_sentence_transformer_files(folder), RESULTS_NAME, "README.md"}
    names |= {name for name in TOKENIZER_FILES if (folder / name).exists()}
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        listed = json.loads((folder / RESULTS_NAME).read_text(encoding="utf-8")).get("files") or []
        names |= {name for name in listed if isinstance(name, str) and name == Path(name).name and name != ".."}
    return sorted(names)


@contextlib.contextmanager
def output_folder(output: str, keep_card: bool = False) -> Iterator[Path]:
    """Yields a staging folder to write the whole CLI output into; when the block ends without an error (or a
    Ctrl-C), the output replaces an earlier one in `output` at once (`drone_hf.saving.atomic_save`): weights, config,
    card, tokenizer and results appear together or not at all. With `keep_card`, the `README.md` of an earlier
    drone-hf output is put in the staging folder first, so that the new card is merged into it (edits kept)."""
    from .saving import atomic_save

    target = Path(output).expanduser().resolve()
    created = [path for path in (target, *target.parents) if not path.exists()]  # deepest first
    try:
        with atomic_save(target, owned_files=_owned_output_files, name=target.name) as staging:
            if keep_card and (target / RESULTS_NAME).is_file() and (target / "README.md").is_file():
                shutil.copy2(target / "README.md", staging / "README.md")
            yield staging
    except BaseException:
        for path in created:  # a failed first save leaves no empty folders behind
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


def write_results(folder: Path, summary: dict) -> None:
    """`folder/drone_results.json`, listing the files of the output (so the next output into the same folder
    replaces exactly them)."""
    from .model_card import _atomic_write

    files = sorted({*(name for name in os.listdir(folder) if not name.startswith(".")), RESULTS_NAME})
    _atomic_write(Path(folder) / RESULTS_NAME, json.dumps({**summary, "files": files}, indent=2, default=float))


__all__ = [
    "RESULTS_NAME",
    "check_model_path",
    "check_output",
    "check_push",
    "check_rank",
    "check_tokenizer",
    "count",
    "model_load_error",
    "number",
    "output_folder",
    "resolve_max_length",
    "write_results",
]
