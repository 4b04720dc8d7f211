"""The `cnntrain` command: subcommand dispatch and error reporting.

Kept import-light (no torch, no Hydra at import time) so that `cnntrain --help` answers at once.
"""

from __future__ import annotations

import contextlib
import importlib
import sys

from cnntrain import __version__
from cnntrain.errors import UserError, did_you_mean, user_path_error
from cnntrain.io import cpus, malloc

COMMANDS = {
    "fit": "train a CNN from the composed config (Hydra overrides, --multirun, --cfg job, --help)",
    "evaluate": "score a checkpoint on a dataset split: per-class metrics, confusion matrix, figures",
    "predict": "classify image files (file, folder or glob) with a checkpoint; top-k table and CSV",
    "explain": "Grad-CAM heat maps: which pixels drove each prediction",
    "export": "write the model as a torch.export .pt2 (default), ONNX, TorchScript or a state_dict, checked",
    "list": "the options of every config group (yours and installed plug-ins' too), with descriptions",
    "report": "one table of a sweep's jobs (overrides, best metric, test, time, status, errors), plus a CSV",
    "lr-find": "learning-rate range test: loss against an exponentially growing lr, plot and suggested lr",
    "init": "write a project of your own: configs/experiment/example.yaml, models.py, README.md",
}

# The commands that print their results rather than log them: what they print goes to their log file too.
_ECHOED = ("evaluate", "predict", "explain", "export")

# Every other command is a module of cnntrain.commands with main(argv); imported only when it runs.
_COMMAND_MODULES = {
    "evaluate": "evaluate",
    "predict": "predict",
    "explain": "explain",
    "export": "export",
    "list": "catalog",
    "report": "report",
    "lr-find": "lr_find",
    "init": "init",
}

USAGE = """\
usage: cnntrain <command> [options and Hydra overrides]

Train convolutional neural networks for image classification from Hydra configs.

commands:
{commands}

examples:
  cnntrain fit                                      # the seed CNN on the embedded MNIST digits
  cnntrain fit model=resnet8 optimizer.lr=3e-3 trainer.epochs=20
  cnntrain fit experiment=smoke                     # a 10-second end-to-end run
  cnntrain fit --multirun optimizer.lr=1e-3,3e-3    # a sweep, one run directory per job
  cnntrain fit --cfg job                            # print the composed config and exit
  cnntrain fit --help                               # config groups, their options and Hydra flags
  cnntrain fit --help trainer                       # a group's keys: type, default, what each means
  cnntrain fit resume=runs/default/<run>            # continue an interrupted run
  cnntrain evaluate ckpt=runs/default/<run>         # test metrics, confusion matrix, figures
  cnntrain predict ckpt=runs/default/<run> inputs=photos/
  cnntrain fit model=custom model._target_=mynets.TinyNet +model.width=16   # your own nn.Module
  cnntrain init myproject                           # a project folder with your configs and models.py

Run `cnntrain <command> --help` for a command's own help. Version {version}.
"""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        width = max(len(c) for c in COMMANDS)
        commands = "\n".join(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items())
        print(USAGE.format(commands=commands, version=__version__))
        return
    if argv[0] in ("-V", "--version"):
        print(f"cnntrain {__version__}")
        return
    command, args = argv[0], argv[1:]
    cpus.mark_start()  # the default thread count looks at how busy the cores were while we started
    malloc.keep_freed_memory()  # CPU steps and evaluation batches reuse memory instead of faulting it in anew
    if command not in COMMANDS:
        _fail(f"unknown command '{command}'{did_you_mean(command, COMMANDS)}; commands: {', '.join(COMMANDS)}", 2)
    from cnntrain.io import logs

    logs.setup_command()  # warnings as one line on stderr (and in the log file); fit's Hydra takes over from here
    try:
        echo = logs.output_to_log() if command in _ECHOED else contextlib.nullcontext()
        # `cnntrain fit | head` stops the display, not the run; the log still gets every line.
        with logs.closed_stdout_safe(), echo:
            if command == "fit":
                from cnntrain.cli.fit import run_fit

                run_fit(args)
            else:
                importlib.import_module(f"cnntrain.commands.{_COMMAND_MODULES[command]}").main(args)
    except UserError as e:
        _fail(str(e), e.exit_code)
    except OSError as e:
        # A path the user gave that cannot be used (a file where a folder must go, a folder where a file must
        # go, no permission, a full disk): one line naming the key and the path, in every command. Any other
        # OSError is a bug and keeps its traceback.
        error = user_path_error(e, args)
        if error is None:
            raise
        _fail(str(error), error.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)


def run() -> None:
    """The console script: main(), then leave without the interpreter's teardown. Freeing torch's modules and
    objects one by one takes about a third of `import torch`'s own time, and a command that has returned has
    nothing left to free. The atexit handlers (logging's flush, ...) still run; a thread still working, an exit
    with a message, or a profiler or tracer around us (`python -m cProfile -m cnntrain` writes its report after
    we return) gets the ordinary exit."""
    code: object = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
    if code is not None and not isinstance(code, int):
        raise SystemExit(code)
    import atexit
    import os
    import threading

    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    busy = any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread())
    if run_exitfuncs is None or sys.getprofile() is not None or sys.gettrace() is not None or busy:
        raise SystemExit(code)
    run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (`cnntrain ... | head`): nothing to say
            stream.flush()
    os._exit(code or 0)


def _fail(message: str, code: int) -> None:
    print(f"cnntrain: error: {message}", file=sys.stderr)
    raise SystemExit(code)
