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
    return options


def _stored_options(checkpoint_adapter: Path | None):
    if checkpoint_adapter is None or not checkpoint_adapter.is_file():
        return None
    try:
        return AdapterConfig.from_json(read_metadata(checkpoint_adapter)["config"]).options
    except (ValueError, KeyError) as e:
        raise ArgError(f"--resume_from_checkpoint: {str(checkpoint_adapter)!r} is no dreamlora adapter: {e}") from None
