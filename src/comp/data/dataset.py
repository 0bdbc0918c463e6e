"""A torch Dataset over a data mixture: record -> images -> processor -> ids and labels.

Bad samples are never replaced by a neighbour: ``__getitem__`` returns a ``Skipped`` marker
(reason, detail, where) instead of a sample. The collator moves the markers into the batch
(``batch["skipped"]``), so they reach the main process whatever the number of workers, and
the training loop feeds them to one ``SkipStats`` that logs each reason once with an example
and stops training past ``max_skip_fraction`` (default 1%).

Image paths are joined to the dataset's image root (see ``comp.data.mixture``); the check
that they stay inside it is lexical (``..`` and absolute paths), so symlinks inside the root
are trusted. A path may enter a zip, tar or parquet shard like a directory
(``images.zip/00453/004539375.jpg``, see ``comp.data.storage``): its member is read in place,
and a member that cannot be read is a ``bad_member`` skip.

``estimate_lengths`` / ``modality_lengths`` (for the length-grouped sampler) parse each
record: text tokens are estimated as UTF-8 bytes / 4 of the turns, plus per image the
processor's exact count from the size the record ships (``width``/``height``,
``image_sizes``) or else from the image header (one file open, no decoding, EXIF orientation
honoured), or a given constant. Lengths are negative for text-only samples, as LLaVA's
sampler expects. Training computes them once per run and data (comp.data.lengths).
"""
from __future__ import annotations

import io
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from comp.data.conversation import encode_conversation, encode_plain_text, text_char_cap

from comp.data.index import JSONSyntaxError, RecordIndex
from comp.data.mixture import DatasetSpec, load_mixture, select_indices
from comp.data.prompts import DEFAULT_PROMPT_FORMAT, check_prompt_format, prompt_messages
from comp.data.records import SKIP_REASONS, Record, SkipSample, assistant_texts, parse_record
from comp.data.storage import ImageLocation, MemberError, read_member, split_archive_path

log = logging.getLogger(__name__)
TEXT_BYTES_PER_TOKEN = 4


@dataclass(frozen=True)
class Skipped:
    """Marker of a bad sample; ``where`` names the file and record."""
    reason: str
    detail: str
    where: str


class TooManySkips(RuntimeError):
    pass


@dataclass
class SkipStats:
    """Counts of kept and skipped samples by reason (aggregated in the main process)."""
    kept: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def update(self, num_kept: int, skipped: list[Skipped]) -> None:
        self.kept += num_kept
        for s in skipped:
            if s.reason not in self.examples:
                self.examples[s.reason] = s
                log.warning("skipping bad samples (%s: %s); first one: %s: %s",
                            s.reason, SKIP_REASONS[s.reason], s.where, s.detail)
            self.counts[s.reason] += 1

    def summary(self) -> str:
        total = self.kept + self.skipped
        lines = [f"{self.skipped} of {total} samples skipped"]
        for reason, n in self.counts.most_common():
            ex = self.examples[reason]
            lines.append(f"  {reason}: {n} (e.g. {ex.where}: {ex.detail})")
        return "\n".join(lines)

    def check(self, max_skip_fraction: float = 0.01, *, min_samples: int = 0) -> None:
        """Raise TooManySkips when more than ``max_skip_fraction`` of samples were skipped
        (judged once ``min_samples`` samples were seen, so one early bad batch is no verdict)."""
        total = self.kept + self.skipped
        if total and total >= min_samples and self.skipped / total > max_skip_fraction:
            raise TooManySkips(f"too many bad samples (more than {max_skip_fraction:.2%}); "
                               f"fix the data or raise the limit.\n{self.summary()}")


def resolve_image_path(root: Path, relative: str) -> Path:
    """``root / relative``, refusing a path that leaves ``root`` (path_escape)."""
    root_n = os.path.normpath(os.path.abspath(root))
    path_n = os.path.normpath(os.path.join(root_n, relative))
    if os.path.commonpath([root_n, path_n]) != root_n:
        raise SkipSample("path_escape", f"image {relative!r} resolves outside the image root {root_n}")
    return Path(path_n)


def locate_image(root: Path, relative: str) -> ImageLocation:
    """The file or archive member (see comp.data.storage) a record's image path names."""
    return split_archive_path(resolve_image_path(root, relative))


def check_image_path(path: Path) -> None:
    """SkipSample unless ``path`` is a regular file: missing_image, or bad_image_path for a
    directory, pipe, socket, device or a name the file system refuses."""
    from comp.data.image import ImagePathError, regular_file

    try:
        regular_file(path)
    except ImagePathError as e:
        if e.kind == "missing":
            raise SkipSample("missing_image", f"image file {path} does not exist") from None
        raise SkipSample("bad_image_path", str(e)) from None


def image_source(location: ImageLocation | Path) -> Path | io.BytesIO:
    """What the image decoder reads: the file's path, or the archive member's bytes in a
    BytesIO named after the member. SkipSample when there is nothing readable."""
    if isinstance(location, Path) or location.member is None:
        path = Path(location if isinstance(location, Path) else location.path)
        check_image_path(path)
        return path
    try:
        data = read_member(location)
    except MemberError as e:
        raise SkipSample("missing_image" if e.kind == "missing" else "bad_member", str(e)) from None
    buffer = io.BytesIO(data)
    buffer.name = str(location)
    return buffer


def open_image(location: ImageLocation | Path, load_image):
    """Load one image, telling a missing file or member or a non-file from an undecodable one
    (``load_image`` raises ImageLoadError, a ValueError, or an OSError from PIL)."""
    source = image_source(location)
    try:
        return load_image(source)
    except (ValueError, OSError) as e:
        raise SkipSample("undecodable_image", f"{location}: {e}") from None


class Source:
    """One dataset of a mixture: its spec, record index and selected record indices."""

    def __init__(self, spec: DatasetSpec, position: int, seed: int):
        self.spec = spec
        self.index = RecordIndex(spec.json_path)
        self.selected = select_indices(spec.strategy, len(self.index), seed=seed, position=position)

    def record(self, i: int) -> Record:
        """Parse record i (index into the file); SkipSample when malformed."""
        try:
            obj = self.index.load(i)
        except JSONSyntaxError as e:
            raise SkipSample("malformed_record", str(e)) from None
        return parse_record(obj, i)

    def where(self, i: int, rid: str | None = None) -> str:
        """``file record i (id X)``, i counting the file's records from 0."""
        return f"{self.spec.json_path} record {i}" + (f" (id {rid})" if rid is not None else "")


ALIGN_MAX_LENGTH = 2048  # the reference's alignment text limit, whatever model_max_length is


class MixtureDataset(Dataset):
    """Samples ``{input_ids [L], labels [L], pixel_values [T, C*P*P] | None,
    image_grid_thw [N, 3] | None, has_image}`` or ``Skipped`` markers."""

    def __init__(self, specs: list[DatasetSpec], tokenizer, image_processor, *,
                 model_max_length: int, seed: int = 0, load_image=None,
                 visual_tokens_per_image: int | None = None, prompt_format: str = DEFAULT_PROMPT_FORMAT,
                 align_max_length: int | None = ALIGN_MAX_LENGTH):
        if load_image is None:
            from comp.data.image import load_image
        self.sources = [Source(spec, k, seed) for k, spec in enumerate(specs)]
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.model_max_length = model_max_length
        self.align_max_length = align_max_length or model_max_length
        self.seed = seed
        self.load_image = load_image
        self.visual_tokens_per_image = visual_tokens_per_image
        self.prompt_format = check_prompt_format(prompt_format)
        self._ends = np.cumsum([len(s.selected) for s in self.sources])
        self._lengths: np.ndarray | None = None

    @classmethod
    def from_yaml(cls, path, tokenizer, image_processor, *, data_root=None, image_folder=None,
                  **kwargs) -> "MixtureDataset":
        specs = load_mixture(path, data_root=data_root, image_folder=image_folder)
        return cls(specs, tokenizer, image_processor, **kwargs)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def locate(self, i: int) -> tuple[Source, int]:
        """(source, record index in its file) of sample i."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self._ends, i, side="right"))
        start = int(self._ends[k - 1]) if k else 0
        return self.sources[k], int(self.sources[k].selected[i - start])

    def __getitem__(self, i: int):
        source, r = self.locate(i)
        record = None
        try:
            record = source.record(r)
            sample = self._encode(source, record, i)
            sample["record"] = source.where(r, record.id)  # named if the step's loss is not finite
            return sample
        except SkipSample as e:
            return Skipped(e.reason, e.detail, source.where(r, record.id if record else e.record_id))

    def _encode(self, source: Source, record: Record, position: int) -> dict:
        locations = [locate_image(source.spec.image_root, p) for p in record.images]
        images = [open_image(loc, self.load_image) for loc in locations]
        sample: dict = {"pixel_values": None, "image_grid_thw": None, "has_image": bool(images)}
        counts: list[int] = []
        if images:
            try:
                vision = self.image_processor(images, return_tensors="pt")
            except ValueError as e:
                raise SkipSample("unprocessable_image", str(e)) from None
            grid_N3 = vision["image_grid_thw"]
            counts = (grid_N3.prod(-1) // self.image_processor.merge_size ** 2).tolist()
            sample["pixel_values"], sample["image_grid_thw"] = vision["pixel_values"], grid_N3
        messages = prompt_messages(record.messages, self.prompt_format)
        ids_L, labels_L = encode_conversation(self.tokenizer, messages, counts,
                                              max_length=self.model_max_length)
        sample["input_ids"], sample["labels"] = ids_L, labels_L
        sample["align_ids"] = self.alignment_text_ids(record, position)
        return sample

    def alignment_text_ids(self, record: Record, position: int) -> torch.Tensor:
        """The F_t text of the alignment loss: the answers in a shuffled order, joined with
        spaces, cut after ``align_max_length`` tokens (the reference's alignment tokenizer has
        ``model_max_length=2048``). The order depends only on (seed, sample position), so runs
        and resumes agree whatever the workers and ranks."""
        answers = assistant_texts(record)
        order = np.random.default_rng([self.seed, position]).permutation(len(answers))
        text = " ".join(answers[k] for k in order)
        text = text[:text_char_cap(self.tokenizer, self.align_max_length)]  # the rest is never used
        ids = encode_plain_text(self.tokenizer, text)["input_ids"][:self.align_max_length]
        return torch.tensor(ids, dtype=torch.long)

    # Lengths for the length-grouped sampler (see comp.data.lengths) ----------------------
    def _estimate_length(self, source: Source, r: int) -> int:
        try:
            obj = source.index.load(r)
            record = parse_record(obj, r)
        except (SkipSample, JSONSyntaxError):
            return 1
        text = sum(len(p["text"].encode()) for m in record.messages for p in m["content"]
                   if p["type"] == "text")
        n = max(1, text // TEXT_BYTES_PER_TOKEN)
        if not record.images:
            return -n
        sizes = shipped_image_sizes(obj, len(record.images))
        for k, relative in enumerate(record.images):
            n += self._visual_tokens(source, relative, sizes[k] if sizes else None)
        return n

    def _visual_tokens(self, source: Source, relative: str, height_width: tuple[int, int] | None) -> int:
        if self.visual_tokens_per_image is not None:
            return self.visual_tokens_per_image
        from comp.data.image import image_size

        try:
            if height_width is None:
                height_width = image_size(image_source(locate_image(source.spec.image_root, relative)))
            return int(self.image_processor.num_visual_tokens(*height_width))
        except (SkipSample, OSError, ValueError):  # a bad sample: skipped when loaded
            return 1

    def estimate_lengths(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Estimated tokens of samples [start, stop), negative for text-only ones."""
        stop = len(self) if stop is None else stop
        return np.array([self._estimate_length(*self.locate(i)) for i in range(start, stop)],
                        dtype=np.int64)

    @property
    def modality_lengths(self) -> np.ndarray:
        """Estimated tokens per sample, negative for text-only samples (LLaVA's convention),
        computed in this process; training shares one pass across ranks (comp.data.lengths)."""
        if self._lengths is None:
            self._lengths = self.estimate_lengths()
        return self._lengths



def shipped_image_sizes(obj: dict, num_images: int) -> list[tuple[int, int]] | None:
    """(height, width) of each image as the record states it: ``"width"``/``"height"`` for a
    single image, or ``"image_sizes": [[width, height], ...]``; None unless complete and sane."""
    if num_images == 1 and "width" in obj and "height" in obj:
        pairs = [(obj["width"], obj["height"])]
    else:
        pairs = obj.get("image_sizes")
    if not isinstance(pairs, list) or len(pairs) != num_images:
        return None
    sizes = []
    for pair in pairs:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair)):
            return None
        sizes.append((pair[1], pair[0]))
    return sizes

