"""The one reading of an ImageFolder, for push, inspect, budget, fetch and training alike.

Each awkward case is decided here, once (docs/datasets.md argues each decision):

- ``train/``, ``val/``, ``test/`` name the splits, in any letter case; ``valid/`` and
  ``validation/`` are aliases of ``val/``. Two folders for one split (``val/`` and ``valid/``)
  are an error. A folder without ``train/`` but with no split folder at all is one folder of
  class subfolders (the split ``"all"``, to be carved).
- val/ and test/ may lack a class that train/ has (a small test set often does); a class in
  val/ or test/ that train/ lacks is an error naming it (a model cannot learn it).
- Only files with an image suffix (``IMAGE_SUFFIXES``, torchvision's ImageFolder list plus GIF
  and PBM) are images. Other files in the tree are skipped and reported (``Layout.note``: a
  count and an example); a file with an image suffix that does not decode is the decoder's
  business (training refuses it by name; push leaves it out and says so).
- Known junk is ignored silently: dotfiles and dot-folders, ``__MACOSX/``, ``Thumbs.db``,
  ``desktop.ini``.
- A folder that holds a single folder (and no images), itself a folder of folders, is stepped
  into, up to ``MAX_NESTING`` levels: archives and downloads often wrap the dataset in one.
- An empty class folder (no image files) is an error naming it; so is a dataset with a single
  class (classification needs two).
- Folders nested inside a class folder belong to that class.

Standard library only: ``backbones validate`` (budget) imports this without numpy or torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from service.errors import UserError

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
JUNK_FILES = frozenset({"thumbs.db", "desktop.ini"})
JUNK_DIRS = frozenset({"__macosx"})
MAX_NESTING = 3


def is_junk(name: str) -> bool:
    """Known junk, ignored without a word: dotfiles, __MACOSX, Thumbs.db, desktop.ini."""
    lower = name.lower()
    return name.startswith(".") or lower in JUNK_FILES or lower in JUNK_DIRS


def is_image(path: str | Path) -> bool:
    """An image by its name: an image suffix, and no junk anywhere in the path."""
    p = PurePosixPath(str(path).replace("\\", "/"))
    return p.suffix.lower() in IMAGE_SUFFIXES and not any(is_junk(part) for part in p.parts)


def missing_classes_note(folder: str, missing: list[str]) -> str:
    """The note for a val/test split that lacks some train classes (allowed: docs/datasets.md),
    worded once for ImageFolders and packed datasets."""
    shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
    return f"{folder}/ has no images of {len(missing)} train class(es): {shown}"


@dataclass
class Layout:
    """An ImageFolder as it lies: classes, and per split the image files of each class."""

    root: Path  # where the data is (a single wrapping folder already stepped into)
    where: str  # the dataset as named in errors and notes
    classes: list[str]  # train's classes (or all of them for a class-folder tree), sorted
    # 'train', 'val', 'test' (in that order) or 'all' -> class -> image files, in canonical
    # order (by path inside the class folder). val/test may lack classes.
    splits: dict[str, dict[str, list[Path]]]
    folders: dict[str, str] = field(default_factory=dict)  # split -> folder as found: 'valid'
    skipped: list[str] = field(default_factory=list)  # files that are not images, root-relative

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def class_dir(self, split: str, cls: str) -> Path:
        return self.root / cls if split == "all" else self.root / self.folders[split] / cls

    def files(self) -> Iterator[tuple[str, str, Path]]:
        """(split, class, path) of every image, in canonical order."""
        for split, by_class in self.splits.items():
            for cls in self.classes:
                for path in by_class.get(cls, []):
                    yield split, cls, path

    def per_class(self, split: str) -> dict[str, int]:
        by_class = self.splits.get(split, {})
        return {c: len(by_class.get(c, [])) for c in self.classes}

    def count(self, split: str) -> int:
        return sum(len(v) for v in self.splits.get(split, {}).values())

    @property
    def skipped_note(self) -> str | None:
        """Files skipped as not images: a count and an example, or None."""
        if not self.skipped:
            return None
        return (
            f"skipped {len(self.skipped)} file(s) that are not images in a class folder (suffix "
            f"not one of {' '.join(sorted(IMAGE_SUFFIXES))}), e.g. {self.skipped[0]}"
        )

    @property
    def notes(self) -> list[str]:
        """What a person should know that is not an error: skipped files, missing classes."""
        out = [self.skipped_note] if self.skipped else []
        for split in ("val", "test"):
            if split in self.splits:
                missing = [c for c, n in self.per_class(split).items() if n == 0]
                if missing:
                    out.append(missing_classes_note(self.folders[split], missing))
        return out


def dataset_root(root: Path) -> Path:
    """Step into a single wrapping folder (as archives often have) when it holds the data."""
    for _ in range(MAX_NESTING):
        entries = [p for p in root.iterdir() if not is_junk(p.name)]
        dirs = [p for p in entries if p.is_dir()]
        images = [p for p in entries if p.is_file() and is_image(p.name)]
        if (
            len(dirs) == 1
            and not images
            and dirs[0].name.lower() not in SPLIT_ALIASES
            and any(p.is_dir() and not is_junk(p.name) for p in dirs[0].iterdir())
        ):
            root = dirs[0]
        else:
            break
    return root


def scan(src: str | Path, where: str | None = None) -> Layout:
    """Read ``src`` as an ImageFolder (train/ val/ test/) or one folder of class subfolders.

    Raises UserError naming the dataset (``where``, default ``src``) and the folder or class.
    """
    src = Path(src)
    where = where or str(src)
    if not src.is_dir():
        raise UserError(f"{where}: not a folder (expected an ImageFolder or class subfolders)")
    root = dataset_root(src)
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not is_junk(p.name))
    folders = _split_folders(subdirs, where)
    skipped = [f.name for f in _loose_files(root)]
    if "train" in folders:
        folders = {s: folders[s] for s in SPLITS if s in folders}
        splits = {}
        for split, name in folders.items():
            splits[split] = _classes(root, root / name, f"{name}/", where, skipped)
            skipped += [f"{name}/{f.name}" for f in _loose_files(root / name)]
        classes = sorted(splits["train"])
        _check_single(classes, f"{where}: {folders['train']}/")
        _check_unknown_classes(splits, folders, where)
    elif folders:
        found = ", ".join(f"{s}/" for s in subdirs)
        raise UserError(f"{where}: missing train/ folder (found {found})")
    elif subdirs:
        splits = {"all": _classes(root, root, "", where, skipped)}
        classes = sorted(splits["all"])
        _check_single(classes, where)
    else:
        raise UserError(
            f"{where}: no class folders (expected train/<class>/* and test/<class>/*, or <class>/*)"
        )
    return Layout(
        root=root,
        where=where,
        classes=classes,
        splits=splits,
        folders=folders,
        skipped=sorted(skipped),
    )


def _split_folders(subdirs: list[str], where: str) -> dict[str, str]:
    """Split -> the folder that holds it, by name in any letter case, aliases included."""
    folders: dict[str, str] = {}
    for name in subdirs:
        split = SPLIT_ALIASES.get(name.lower())
        if split is None:
            continue
        if split in folders:
            raise UserError(
                f"{where}: both {folders[split]}/ and {name}/ hold the {split} split; keep one"
            )
        folders[split] = name
    return folders


def _check_unknown_classes(splits: dict, folders: dict[str, str], where: str) -> None:
    """A val/ or test/ class that train/ lacks: the model would have no output for it."""
    for split in ("val", "test"):
        extra = sorted(set(splits.get(split, {})) - set(splits["train"]))
        if extra:
            names = ", ".join(repr(c) for c in extra[:5]) + (" ..." if len(extra) > 5 else "")
            what = (
                f"class {names} in {folders[split]}/ is"
                if len(extra) == 1
                else (f"classes {names} in {folders[split]}/ are")
            )
            raise UserError(f"{where}: {what} not in {folders['train']}/")


def _loose_files(folder: Path) -> list[Path]:
    """Files lying beside the class folders: in no class, so skipped (and noted)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not is_junk(p.name))


def _classes(
    root: Path, split_dir: Path, rel: str, where: str, skipped: list[str]
) -> dict[str, list[Path]]:
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not is_junk(p.name))
    if not classes:
        raise UserError(f"{where}: {rel}: no class folders (expected {rel}<class>/<image files>)")
    out = {}
    for cls in classes:
        _check_class_name(cls, rel, where)
        images, others = [], []
        for p in (split_dir / cls).rglob("*"):
            inside = p.relative_to(split_dir)
            if not p.is_file() or any(is_junk(part) for part in inside.parts):
                continue
            (images if inside.suffix.lower() in IMAGE_SUFFIXES else others).append(p)
        if not images:
            extra = (
                f" (only files without an image suffix, e.g. {others[0].name})" if others else ""
            )
            raise UserError(f"{where}: class {cls!r} in {rel} has no images{extra}")
        images.sort(key=lambda p: p.relative_to(split_dir).as_posix())
        out[cls] = images
        skipped += [p.relative_to(root).as_posix() for p in others]
    return out


def _check_class_name(cls: str, rel: str, where: str) -> None:
    # A class name lands in report tables, logs and status lines: a newline in it would forge
    # lines there (a spec refuses the same characters in its own strings).
    from service.spec.limits import check_text

    try:
        check_text(cls)
    except ValueError as e:
        raise UserError(f"{where}: class folder {rel}{cls!r}: {e}; rename it") from None


def _check_single(classes: list[str], what: str) -> None:
    if len(classes) < 2:
        raise UserError(
            f"{what} has a single class {classes[0]!r}: classification needs at least 2 classes"
        )
