"""`cnntrain init DIR`: a small project of the user's own, outside the package.

It writes configs/experiment/example.yaml, a models.py with one example network (used through
model=custom) and a README. From inside DIR, configs/ joins Hydra's search path (see
cnntrain.config.compose), so `cnntrain fit experiment=example` works with no other flag.
"""

from __future__ import annotations

from pathlib import Path

from cnntrain.errors import UserError

HELP = """\
usage: cnntrain init [DIR]

Write a small cnntrain project into DIR (default: the current folder), next to nothing of cnntrain's:

  configs/experiment/example.yaml   a recipe: the network of models.py on the embedded digits
  models.py                         one commented example network (model=custom model._target_=models.ExampleNet)
  README.md                         how the folder is used

Then, from inside DIR:
  cnntrain fit experiment=example   # trains models.ExampleNet (a few seconds on a CPU)
  cnntrain list                     # your options are marked "yours"

Run from DIR, its configs/ folder joins the config search path of cnntrain fit: your groups'
options add to the built-in ones, and a file with a built-in option's name replaces it (with a
note). Existing files are never overwritten.
"""

MODELS_PY = '''\
"""Your networks. Use one with

    cnntrain fit model=custom model._target_=models.ExampleNet +model.width=32

or name it in a config, as configs/experiment/example.yaml does. cnntrain calls the class (or any function
that returns an nn.Module) with
  - in_channels, num_classes and image_size (a (height, width) tuple) when its signature names them: they
    come from the dataset;
  - every other key set under `model` (model.width=32, +model.depth=3) as a keyword argument: a key it does
    not take is refused.
forward() gets float batches [N, in_channels, H, W], already normalised, and returns logits [N, num_classes].
The classifier is the `head` attribute (else the last nn.Linear): model.dropout, model.freeze_backbone and
model.backbone_lr_scale act on it. Checkpoints record model._target_ and the arguments, so evaluate,
predict, explain, export and resume rebuild the network from the checkpoint (run them from this folder,
or put it on PYTHONPATH, so that `models` can be imported).
"""

from torch import nn


class ExampleNet(nn.Module):
    """Three 3x3 conv blocks (width, then 2 x width channels), global average pooling, a linear head."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # any image size works
        )
        self.head = nn.Linear(2 * width, num_classes)  # the classifier: model.dropout goes before it

    def forward(self, x):
        return self.head(self.features(x))
'''

EXAMPLE_YAML = """\
# @package _global_
# Example recipe: ExampleNet of models.py on the embedded MNIST digits, 2 epochs (cnntrain fit experiment=example)
defaults:
  - override /model: custom

name: example
model:
  _target_: models.ExampleNet  # models.py beside configs/: the folder cnntrain runs from is importable
  width: 16  # a keyword argument of ExampleNet; keys of its own need no declaring either
optimizer:
  lr: 3e-3
trainer:
  epochs: 2
"""

README_MD = """\
# {name}: a cnntrain project

```bash
cnntrain fit experiment=example          # trains models.ExampleNet on the embedded digits
cnntrain fit experiment=example model.width=32 trainer.epochs=5
cnntrain list                            # your options are marked "yours"
cnntrain evaluate ckpt=runs/example/<run>
```

- `models.py`: your networks. Use one with `model=custom model._target_=models.<Name>`; other keys under
  `model` (`+model.depth=3`) are its keyword arguments.
- `configs/`: run from this folder, it joins cnntrain's config search path ahead of the built-in configs:
  add options to any group (`configs/experiment/*.yaml`, `configs/model/*.yaml`, `configs/dataset/*.yaml`,
  ...). A file with the name of a built-in option replaces it, and cnntrain prints a note saying so. From
  elsewhere, pass the folder: `cnntrain fit --config-dir {name}/configs experiment=example` (with
  `{name}` on `PYTHONPATH` for `models.py`).
- `runs/`: every run's directory (config, checkpoints, TensorBoard logs, metrics).
"""


def main(argv: list[str]) -> None:
    from cnntrain.commands.args import print_help, wants_help

    if wants_help(argv):
        print_help(HELP)
        return
    if len(argv) > 1 or any(a.startswith("-") or "=" in a for a in argv):
        raise UserError(f"cnntrain init takes one folder, got: {' '.join(argv)}; see `cnntrain init --help`")
    folder = Path(argv[0] if argv else ".").expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file; cnntrain init writes a project into a folder")
    name = folder.resolve().name or "project"
    files = {
        folder / "configs" / "experiment" / "example.yaml": EXAMPLE_YAML,
        folder / "models.py": MODELS_PY,
        folder / "README.md": README_MD.format(name=name),
    }
    existing = [str(p) for p in files if p.exists()]
    if existing:
        raise UserError(
            f"{', '.join(existing)} exist{'s' if len(existing) == 1 else ''} already; cnntrain init "
            "never overwrites a file: pick a new folder or move them away"
        )
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    where = "" if folder.resolve() == Path.cwd().resolve() else f"cd {folder} && "
    print(f"wrote {', '.join(str(p) for p in files)}")
    print(f"next: {where}cnntrain fit experiment=example")
