"""The options of the trained method for one run: the flags given, else the method's run-dependent defaults,
else what a resumed checkpoint was trained with."""

from __future__ import annotations

from pathlib import Path

from dreamlora.config import AdapterConfig
from dreamlora.errors import ArgError
from dreamlora.io import read_metadata


def resolve_method_options(args, total_steps: int, checkpoint_adapter: Path | None) -> dict:
    """The options of `--adapter`'s method for this run, by field name: the flags given; where a flag is not given,
    the method's run-dependent default (`Options.run_defaults`, e.g. SingLoRA's T = 1 % of the steps), except
    that a resumed checkpoint keeps the value it was trained with (a resume with another --max_train_steps must
    not change it). The resolved values are written back into `args` under their flag names, for run.json."""
    from dreamlora.methods import METHODS
    from dreamlora.options import given_options, option_specs

    cls = METHODS[args.adapter]
    given = given_options(cls, vars(args))
    run_dependent = cls.Options.run_defaults(total_steps)
    stored = _stored_options(checkpoint_adapter) if run_dependent else None
    if not isinstance(stored, cls.Options):
        stored = None  # another method's checkpoint: loading its state refuses it with a clearer message
    specs = {s.field: s for s in option_specs(cls)}
    for name in run_dependent:
        if stored is not None and name in given and given[name] != getattr(stored, name):
            raise ArgError(f"--{specs[name].flag} {given[name]}: the checkpoint being resumed was trained with "
                           f"{getattr(stored, name)}; drop the flag or pass the same value")
        if stored is not None:
            given[name] = getattr(stored, name)
    options = {**run_dependent, **given}
    for name, value in options.items():
        setattr(args, specs[name].flag, value)
    _check_for_run(cls, args, options, total_steps)
    return options


def _check_for_run(cls, args, options: dict, total_steps: int) -> None:
    """The method's own checks against this run (`MethodOptions.check`): one ArgError naming the flag."""
    try:
        instance = cls.Options(**options)
        config = AdapterConfig(method=args.adapter, rank=args.rank, alpha=args.alpha, options=instance)
        instance.check(config, total_steps)
    except ValueError as e:
        raise ArgError(str(e)) from None


def check_optimizer(args, optimizer) -> None:
    """The trained method's word on the optimizer (`AdapterLayer.check_optimizer`), naming the flag that chose it."""
    from dreamlora.methods import METHODS

    try:
        METHODS[args.adapter].check_optimizer(optimizer)
    except ValueError as e:
        chosen_by = "--use_8bit_adam: " if getattr(args, "use_8bit_adam", False) else ""
        if str(getattr(args, "optimizer", "AdamW")).lower() != "adamw":
            chosen_by = f"--optimizer {args.optimizer}: "
        raise ArgError(f"{chosen_by}{e}") from None


def _stored_options(checkpoint_adapter: Path | None):
    if checkpoint_adapter is None or not checkpoint_adapter.is_file():
        return None
    try:
        return AdapterConfig.from_json(read_metadata(checkpoint_adapter)["config"]).options
    except (ValueError, KeyError) as e:
        raise ArgError(f"--resume_from_checkpoint: {str(checkpoint_adapter)!r} is no dreamlora adapter: {e}") from None
