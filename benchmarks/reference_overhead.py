"""Cost of the reference Δ-STN / STN step (the authors' code) against one plain step, on this machine.

RESULTS.md compares our step overhead with the reference implementation's; this times the
reference step on the MNIST MLP of its ``examples/mlp`` the way ``overhead.py`` times ours (same
plain model, inputs, warm-up, alternation, medians, T_train/T_valid = 5/1), so the two ratios
come from one machine. The reference code is not vendored: get it with

    git clone https://github.com/pomonam/Self-Tuning-Networks

and point ``--reference-repo`` at the checkout. Its modules are imported at run time.

    python benchmarks/reference_overhead.py --reference-repo Self-Tuning-Networks --json out.json
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
# The reference repo's top-level package names; a module of the same name already imported from
# elsewhere would silently stand in for theirs.
REFERENCE_TOP_LEVEL = ("base_step_optimizer", "base_model", "hyper", "layers", "utils")
MODES = ("delta", "stn")

# Starting values and optimizer settings of the reference examples/mlp/train.py run with
# --delta_stn --linearize --tune_scales --entropy_weight 1e-3 (or without --delta_stn --linearize
# for STN), as in its README.
DROPOUT_INIT = 0.05
DROPOUT_SCALE = 1.0
DROPOUT_RANGE = (0.0, 0.95)
LR = 1e-2
ENTROPY_WEIGHT = 1e-3


def _load_file(name: str, path: Path) -> ModuleType:
    """Import a script by path, so this works whether or not benchmarks/ is on sys.path."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Timer, plain model, inputs and T_TRAIN_PER_VAL come from overhead.py so both scripts measure alike.
overhead = _load_file("bench_overhead_for_reference", HERE / "overhead.py")


def import_reference(repo: Path) -> SimpleNamespace:
    """The reference step optimizers, hyper container and MLP, imported from a checkout.

    Only model / container / step-optimizer modules are imported: train.py and base_trainer.py
    need wandb and MNIST downloads, which timing does not.
    """
    if not (repo / "base_step_optimizer.py").is_file():
        raise SystemExit(
            f"--reference-repo {repo}: no base_step_optimizer.py there; pass a checkout of "
            "https://github.com/pomonam/Self-Tuning-Networks"
        )
    root = str(repo.resolve())
    for name in REFERENCE_TOP_LEVEL:
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None) or ""
        if module is not None and not origin.startswith(root):
            raise SystemExit(f"a module named {name!r} is already imported from {origin or '?'}; "
                             "it would shadow the reference repo's")
    sys.path.insert(0, root)
    step = importlib.import_module("base_step_optimizer")
    container = importlib.import_module("hyper.container")
    # examples/ has no __init__.py (a namespace package), so another examples/ on sys.path, such
    # as this repo's, could win; load the model file by path instead.
    model = _load_file("reference_mlp_model", repo / "examples" / "mlp" / "model.py")
    return SimpleNamespace(step=step, container=container, model=model)


def build_reference(ref: SimpleNamespace, mode: str, device: torch.device):
    """(step optimizer, hyper container) as the reference examples/mlp/train.py builds them."""
    h_container = ref.container.HyperContainer(device)
    for name in ("dropout0", "dropout1", "dropout2"):
        h_container.register(name, DROPOUT_INIT, DROPOUT_SCALE, min_range=DROPOUT_RANGE[0],
                             max_range=DROPOUT_RANGE[1], discrete=False, same_perturb_mb=False)
    torch.manual_seed(0)
    # Its forward runs only the first three of its four StnLinear layers (784-1200-1200-1200, 1200
    # logits), within 0.3% of the plain 784-1200-1200-1200-10's FLOPs; timed as it is.
    model = ref.model.StnThreeLayerMLP(input_dim=784, output_dim=10, num_hyper=h_container.get_size(),
                                       h_container=h_container).to(device)
    criterion = nn.CrossEntropyLoss(reduction="mean").to(device)
    hyper_opt = torch.optim.RMSprop([h_container.h_tensor], lr=LR)
    scale_opt = torch.optim.RMSprop([h_container.h_scale], lr=LR)
    if mode == "delta":
        general_opt = torch.optim.SGD(model.get_general_parameters(), lr=LR, momentum=0.9)
        response_opt = torch.optim.SGD(model.get_response_parameters(), lr=LR, momentum=0.9)
        opt = ref.step.DeltaStnStepOptimizer(model, general_opt, response_opt, hyper_opt, scale_opt,
                                             criterion, h_container, True, ENTROPY_WEIGHT, True)
    else:
        model_opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        opt = ref.step.StnStepOptimizer(model, model_opt, hyper_opt, scale_opt, criterion, h_container,
                                        True, ENTROPY_WEIGHT)
    return opt, h_container


def _reference_step(
    opt, h_container, x: torch.Tensor, y: torch.Tensor, tune_hyper: bool
) -> Callable[[], object]:
    """One call of the reference trainer's loop body: fresh perturbed hyperparameters, then a step.

    Data loading, ``loss.item()`` and wandb logging are left out, as in overhead.py's steps.
    """

    def run() -> object:
        perturbed = h_container.get_perturbed_hyper(x.shape[0])
        return opt.step(x, y, perturbed_h_tensor=perturbed, augmented_inputs=None, tune_hyper=tune_hyper)

    return run


def measure(
    ref: SimpleNamespace, modes: list[str], repeats: int, warmup: int, batch: int | None
) -> list[dict]:
    device = torch.device("cpu")
    timer = overhead._timer(device)
    factory, _, x, y, loss_fn, lr = overhead._setup("mlp", device, batch)
    g = torch.Generator().manual_seed(1)
    x_val, y_val = torch.randn(x.shape, generator=g), torch.randint(0, 10, y.shape, generator=g)

    torch.manual_seed(0)
    plain_step = overhead.plain_sgd_step(factory().to(device), x, y, loss_fn, lr)

    rows = []
    for mode in modes:
        opt, h_container = build_reference(ref, mode, device)
        name = f"reference_{mode}"
        plain, train, val = overhead.time_side_by_side(
            timer, plain_step, _reference_step(opt, h_container, x, y, tune_hyper=False),
            _reference_step(opt, h_container, x_val, y_val, tune_hyper=True), repeats, warmup,
        )
        rows.append(overhead.result_row("mlp", device, name, int(x.shape[0]), plain, train, val))
        print(f"{'mlp':>10} {str(device):>6} {name:>15} {plain:10.2f} {rows[-1]['hyper_ms']:10.2f} "
              f"{rows[-1]['ratio']:7.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference-repo", default=None, metavar="PATH",
                        help="checkout of github.com/pomonam/Self-Tuning-Networks (required)")
    parser.add_argument("--modes", default="delta,stn", help="comma list: delta,stn")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.reference_repo is None:
        raise SystemExit("--reference-repo PATH is required: a checkout of "
                         "https://github.com/pomonam/Self-Tuning-Networks")
    modes = [m.strip() for m in args.modes.split(",")]
    if unknown := [m for m in modes if m not in MODES]:
        raise SystemExit(f"unknown mode(s) {unknown}: choose from {', '.join(MODES)}")
    ref = import_reference(Path(args.reference_repo))
    torch.set_num_threads(args.threads)
    print(f"{'model':>10} {'device':>6} {'mode':>15} {'plain ms':>10} {'tuned ms':>10} {'ratio':>7}")
    rows = measure(ref, modes, args.repeats, args.warmup, args.batch)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
