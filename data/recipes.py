"""What each dataset becomes once prepared: source format, stored size, bits, splits and augmentation.

The recipe is data, not branches in code: `prepare` reads it to decide how to decode and crop, and the loaders
read it back from the manifest to pick the default augmentation (NVAE flips CIFAR-10, ImageNet 32, CelebA 64,
CelebA HQ and FFHQ at random when training, never when evaluating; never MNIST or Fashion-MNIST).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from common.errors import DataError

SourceKind = Literal[
    "idx", "stacked-idx", "omniglot", "cifar10", "imagenet32", "imagenet64", "lsun", "images"
]
SplitRule = Literal["files", "partition", "fraction", "subdirs"]

# CelebA "aligned" images are 178x218 (W x H). NVAE and Glow crop the box (left=15, top=40, right=163,
# bottom=188), a 148x148 square, before resizing to 64. Stored relative to the image so that it applies to
# any input size and is exact for the real one.
CELEBA_CROP_REL: tuple[float, float, float, float] = (40 / 218, 15 / 178, 148 / 218, 148 / 178)

# Official CelebA partition by image number (list_eval_partition.txt), used when that file is absent.
CELEBA_PARTITION_BOUNDS: tuple[int, int] = (162770, 182637)  # last train id, last valid id

# CelebA HQ (Glow: 27k train / 3k test) and FFHQ (NVAE: 63k / 7k) both split 90 % / 10 % in sorted order.
TRAIN_FRACTION = 0.9


@dataclass(frozen=True)
class Recipe:
    """How one dataset is prepared and augmented.

    `size` is the stored side (H = W); None means it comes from the caller (`--size`). `crop_rel` is a
    (top, left, height, width) box relative to the decoded image, applied before resizing. `formats`: the
    source formats of a dataset offered in several (`--format`), the authors' first. `sizes`: for a dataset
    whose side comes from the caller, the sides allowed (empty: any).
    """

    name: str
    source_kind: SourceKind
    size: int | None
    channels: int
    default_bits: int
    flip: bool
    binarize: bool
    split_rule: SplitRule
    crop_rel: tuple[float, float, float, float] | None = None
    description: str = ""
    eval_split: str = "test"  # the split the authors report on (`nvae evaluate` default)
    formats: tuple[str, ...] = ()
    sizes: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["crop_rel"] = list(self.crop_rel) if self.crop_rel else None
        d["formats"] = list(self.formats)
        d["sizes"] = list(self.sizes)
        return d


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "mnist",
            "idx",
            28,
            1,
            8,
            flip=False,
            binarize=True,
            split_rule="files",
            description="idx files train-images-idx3-ubyte[.gz] and t10k-images-idx3-ubyte[.gz]; 60k/10k",
        ),
        Recipe(
            "fashion-mnist",
            "idx",
            28,
            1,
            8,
            flip=False,
            binarize=False,
            split_rule="files",
            description="idx files as for MNIST; 60k/10k, kept 8-bit grayscale",
        ),
        Recipe(
            "stacked-mnist",
            "stacked-idx",
            28,
            3,
            8,
            flip=False,
            binarize=False,  # the authors' stacked-MNIST transforms: pad and scale, no binarization
            split_rule="files",
            description="MNIST's idx files, three digits per image as its R, G and B channels (seeded "
            "permutations, the authors' rule); 120k/20k, kept 8-bit",
        ),
        Recipe(
            "omniglot",
            "omniglot",
            28,
            1,
            8,
            flip=False,
            binarize=True,
            split_rule="files",
            description="Burda et al.'s chardata.mat ('data' and 'testdata'); 24,345/8,070, binarized when used",
        ),
        Recipe(
            "cifar10",
            "cifar10",
            32,
            3,
            8,
            flip=True,
            binarize=False,
            split_rule="files",
            description="python-pickle batches (directory or cifar-10-python.tar.gz); 50k/10k",
        ),
        Recipe(
            "imagenet32",
            "imagenet32",
            32,
            3,
            8,
            flip=True,  # the authors' train transform for ImageNet: RandomHorizontalFlip (datasets.py)
            binarize=False,
            split_rule="files",
            description="the authors' Glow TFRecords (imagenet-oord-tfr.tar: train/, validation/ "
            "*-r05-s-*-of-*.tfrecords), or --format npz for Chrabaszcz et al.'s train_data_batch_*.npz and "
            "val_data.npz; 1.28M/50k",
            formats=("tfrecord", "npz"),
        ),
        Recipe(
            "imagenet64",
            "imagenet64",
            64,
            3,
            8,
            flip=True,
            binarize=False,
            split_rule="files",
            description="the authors' Glow TFRecords (imagenet-oord-tfr.tar: train/, validation/ "
            "*-r06-s-*-of-*.tfrecords), or --format npz for Chrabaszcz et al.'s 64x64 train_data_batch_*.npz and "
            "val_data.npz; 1.28M/50k",
            formats=("tfrecord", "npz"),
        ),
        *(
            Recipe(
                name,
                "lsun",
                None,
                3,
                8,
                flip=True,
                binarize=False,
                split_rule="files",
                description=f"LSUN's {category}_train_lmdb and {category}_val_lmdb (val as test), resized "
                "(shorter side) and centre-cropped to --size 64, 128 or 256",
                sizes=(64, 128, 256),
            )
            for name, category in (
                ("lsun-bedroom", "bedroom"),
                ("lsun-church", "church_outdoor"),
                ("lsun-tower", "tower"),
            )
        ),
        Recipe(
            "celeba64",
            "images",
            64,
            3,
            8,
            flip=True,
            binarize=False,
            split_rule="partition",
            crop_rel=CELEBA_CROP_REL,
            description="aligned JPEG folder; 148x148 crop at (15, 40), resized to 64; train/valid/test from list_eval_partition.txt",
            eval_split="valid",  # the authors evaluate CelebA 64 on the validation partition
        ),
        Recipe(
            "celebahq256",
            "images",
            256,
            3,
            5,
            flip=True,
            binarize=False,
            split_rule="fraction",
            description="PNG/JPEG folder resized to 256; first 90 % (27k) train, last 10 % (3k) test",
        ),
        Recipe(
            "ffhq256",
            "images",
            256,
            3,
            5,
            flip=True,
            binarize=False,
            split_rule="fraction",
            description="PNG/JPEG folder resized to 256; first 63k train, last 7k test",
        ),
        Recipe(
            "image-folder",
            "images",
            None,
            3,
            8,
            flip=False,
            binarize=False,
            split_rule="subdirs",
            description="any PNG/JPEG folder (needs --size): train/ and test/ subfolders, else a 90/10 split",
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    """The recipe of dataset `name`; DataError naming the allowed ones otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(RECIPES)}") from None


def default_eval_split(dataset: str) -> str:
    """The split the authors report a dataset's NLL on: `valid` for CelebA 64, `test` for the rest (and for
    datasets without a recipe)."""
    recipe = RECIPES.get(dataset)
    return recipe.eval_split if recipe else "test"
